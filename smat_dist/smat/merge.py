"""Task-specific expert merging θ_i = θ_pre + (Σ_m α_im z_m) ⊙ θδ as one autograd node.

Why a custom node: with ``G_t = ∂L_t/∂θ_t`` the gradients are closed-form,

    ∇θδ = m_t ⊙ G_t,   ∇α_t,m = <z_m, θδ ⊙ G_t>,   ∇z_m = Σ_t α_t,m (θδ ⊙ G_t),

so a task never needs autograd's per-expert (M, |θ|) intermediates. Gates are drawn once per
meta-step (``GateConfig.noise_scope = "step"``), so the gate-logit gradient
∇φ = dz/dφ ⊙ (Aᵀ P) + ∇(L0 term) is formed once, at the step's last task ("flush"), in one
chunked pass that also adds the expected-L0 gradient: a task costs two passes over the (M, G)
gates (the merge and ∇α) and the step one more, instead of the ~10 per task a generic autograd
graph takes; and only one (M, G) gradient buffer ever exists.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from smat_dist.smat.gates import GateLayout, GateSample, HardConcreteGates


class MergePlan:
    """One gate draw, shared by the tasks merged against it, with their deferred gate gradients."""

    def __init__(
        self,
        layout: GateLayout,
        sample: Optional[GateSample],
        gates: Optional[HardConcreteGates] = None,
        defer: bool = True,
        capacity: int = 0,
    ):
        self.layout = layout
        self.z = None if sample is None else sample.z
        self.gates = gates if (sample is not None and sample.stochastic) else None
        self.defer = defer
        self.capacity = capacity
        self._alphas: List[torch.Tensor] = []
        self._rows: List[torch.Tensor] = []
        self._buffer: Optional[torch.Tensor] = None
        self.density: Optional[torch.Tensor] = None  # E_m of the last forward that asked for it

    @property
    def pending(self) -> int:
        return len(self._alphas)

    def _push(self, alpha: torch.Tensor, vec: torch.Tensor) -> None:
        i = len(self._alphas)
        if self.capacity > i:  # write straight into one (capacity, G) block: no stacking copy
            if self._buffer is None:
                self._buffer = torch.empty(self.capacity, vec.shape[0], dtype=vec.dtype, device=vec.device)
            self._buffer[i].copy_(vec)
            vec = self._buffer[i]
        self._alphas.append(alpha)
        self._rows.append(vec)

    def _stacked(self) -> torch.Tensor:
        n = len(self._rows)
        if self._buffer is not None and n <= self.capacity and all(
            r.data_ptr() == self._buffer[i].data_ptr() for i, r in enumerate(self._rows)
        ):
            return self._buffer[:n]
        return torch.stack(self._rows)

    def gate_grad(self, alpha, vec, flush: bool, delta: torch.Tensor, grad_density) -> Optional[torch.Tensor]:
        """∂L/∂φ, or None while deferred to the flush. ``vec`` is θδ⊙G reduced to groups
        (interpolated experts) or G itself (independent experts)."""
        gates = self.gates
        if gates is None:
            return None
        self._push(alpha, vec)
        if self.defer and not flush:
            return None
        a = torch.stack(self._alphas).to(vec.dtype)  # (B, M)
        v = self._stacked()  # (B, G) or (B, N)
        independent = delta.shape[0] > 1
        full = None
        if independent:  # ablation path: expert m sees θδ_m ⊙ G_t; unchunked is fine
            full = self.layout.reduce((a.t() @ v).mul_(delta))
        # The flush is the last use of this draw's gates, so ∇φ is written over z chunk by chunk:
        # one (M, G) buffer fewer at the step's peak (0.69 GB for ViT-S, M=8).
        out, self.z = self.z, None
        for s, e in gates.chunks():
            g = full[:, s:e] if full is not None else a.t() @ v[:, s:e]
            g.mul_(gates.dz_dphi_(out[:, s:e].clone()))
            if grad_density is not None:
                gates.density_grad_(g, grad_density, s, e)
            out[:, s:e] = g
        self._alphas.clear()
        self._rows.clear()
        self._buffer = None
        return out


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, logits, alpha, pre, plan: MergePlan, flush: bool, with_density: bool):
        ctx.plan, ctx.flush, ctx.with_density = plan, flush, with_density
        z = plan.z
        if delta.shape[0] == 1:  # interpolated experts share θδ
            if z is None:
                m = alpha.sum().expand(pre.shape[0])
            else:
                m = plan.layout.expand(alpha.to(z.dtype) @ z)
            theta = torch.addcmul(pre, m, delta[0])
            ctx.save_for_backward(delta, alpha, m)
        else:  # independent experts θδ_m
            w = delta if z is None else delta * plan.layout.expand(z)
            theta = pre + alpha.to(w.dtype) @ w
            ctx.save_for_backward(delta, alpha, None)
        if with_density:
            plan.density = plan.gates.density_value()
            return theta, plan.density.clone()
        return theta

    @staticmethod
    def backward(ctx, grad, grad_density=None):
        delta, alpha, m = ctx.saved_tensors
        plan: MergePlan = ctx.plan
        z = plan.z
        need_delta, need_logits, need_alpha = ctx.needs_input_grad[:3]
        g_delta = g_logits = g_alpha = None
        if delta.shape[0] == 1:
            if need_delta:
                g_delta = (m * grad).unsqueeze(0)
            p = delta[0] * grad
            if z is None:
                g_alpha = p.sum().expand(alpha.shape[0]).to(alpha.dtype)
            else:
                pg = plan.layout.reduce(p)
                g_alpha = (z @ pg).to(alpha.dtype)
                g_logits = plan.gate_grad(alpha.detach(), pg, ctx.flush, delta, grad_density)
        else:
            zn = None if z is None else plan.layout.expand(z)
            if need_delta:
                g_delta = alpha[:, None].to(grad.dtype) * grad[None, :]
                if zn is not None:
                    g_delta = g_delta * zn
            w = delta if zn is None else delta * zn
            g_alpha = (w @ grad).to(alpha.dtype)
            if zn is not None:
                g_logits = plan.gate_grad(alpha.detach(), grad, ctx.flush, delta, grad_density)
        if not need_alpha:
            g_alpha = None
        if not need_logits:
            g_logits = None
        return g_delta, g_logits, g_alpha, None, None, None, None


def merge(
    pre: torch.Tensor,
    delta: torch.Tensor,
    logits: Optional[torch.Tensor],
    alpha: torch.Tensor,
    plan: MergePlan,
    flush: bool,
    with_density: bool = False,
):
    """Flat task weights θ_t; with ``with_density`` also the experts' expected density E (M,).

    ``flush`` marks the last task merged against ``plan`` (its backward forms ∇φ). A loss term
    built from the returned E has its gradient folded into that same ∇φ.
    """
    if with_density and (plan.gates is None or (plan.defer and not flush)):
        raise ValueError("with_density needs a training gate draw and the flushing task")
    if logits is None:
        logits = torch.zeros((), device=pre.device)  # placeholder input, never gets a gradient
    elif plan.defer and not flush:
        # Only the flushing task links φ into the graph: the others' gate gradients are deferred,
        # and hooks on φ (ZeRO-2's gradient reduction) must see one gradient per step, not None.
        logits = logits.detach()
    return _Merge.apply(delta, logits, alpha, pre, plan, flush, with_density)
