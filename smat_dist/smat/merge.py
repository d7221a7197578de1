"""Task-specific expert merging θ_i = θ_pre + (Σ_m α_im z_m) ⊙ θδ as one autograd node.

Why a custom node: with ``G_t = ∂L_t/∂θ_t`` the gradients are closed-form,

    ∇θδ = m_t ⊙ G_t,   ∇α_t,m = <z_m, θδ ⊙ G_t>,   ∇z_m = Σ_t α_t,m (θδ ⊙ G_t),

so a task never needs autograd's per-expert (M, |θ|) intermediates. Gates are drawn once per
meta-step (``GateConfig.noise_scope = "step"``), so the gate-logit gradient
∇φ = dz/dφ ⊙ (Aᵀ P) + ∇(L0 term) is formed once per step ("the flush"), in one fused pass that
also adds the expected-L0 gradient and (``GateConfig.alpha_grad = "flush"``, :class:`MergePlan`'s
``fold_alpha``) forms every task's ∇α: a task costs one pass over the (M, G) gates (its merge) and the
step one more, instead of the ~10 per task a generic autograd graph takes. The ∇α of a task whose
merge was given ``alpha_params`` waits for the flush, and so does its α's backward into those
parameters (the hypernetwork), run there task by task (docs/algorithm.md#alpha-grad-in-the-flush).

Memory: the step's gate draw is never stored (:class:`~smat_dist.smat.gates.GateDraw` holds the
keys of its counter noise; the merge, ∇α and the flush each recompute z in their fused pass), so the
only (M, G) buffer is ∇φ itself, allocated by the flush. A task's backward only stores its reduced
vector θδ⊙G_t (one row of a preallocated (tasks, G) block) and α_t until then.

Backward order. Each task merged against a :class:`MergePlan` gets a slot in forward order; the
merge called with ``flush=True`` is the step's last and closes the plan. The flush runs in the
backward that completes the plan (every slot's backward has arrived), whichever task's that is,
and reads the rows in slot order, so ∇φ does not depend on the order of the backwards at all.
What the order does decide is which merge must be linked to φ in the graph, because a backward
can only return ∇φ through a node that has φ as an input:

* ``joint_backward=False`` (default; what :func:`smat_dist.train.recipe.meta_step` does): only
  the flushing task links φ, so φ's gradient hooks (ZeRO-2's reduction) run once per step, with
  the whole ∇φ, in the flushing task's backward. Correct for any order in which that backward
  comes last, e.g. one task at a time. If the flushing task's backward arrives while others are
  missing (a summed backward over the step's tasks does that: autograd runs the most recently
  created node first), it raises a RuntimeError: ∇φ cannot be returned later through a node
  that has run, and the alternatives (linking every task, or returning a ∇φ per task) would run
  φ's hooks once per task or need a second (M, G) buffer.
* ``joint_backward=True``: every task links φ and the completing backward returns ∇φ; correct
  for every order, e.g. one ``backward()`` of the summed losses of a batched step (φ's hooks then
  also run once). Split into several backward calls, the earlier calls run φ's hooks with no
  gradient: use it with one backward call per step.

(docs/algorithm.md#backward-order has the table.)

A backward against a plan that has already flushed always raises.

Precision: the merge, ∇α and ∇φ run in fp32 (fp64 for an fp64 model) with autocast off
(:mod:`smat_dist.smat.precision`); a bf16 Σ_m α_m z_m put a relative error of about 2.5e-3 on every
merged weight m·θδ.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from smat_dist.smat.gates import GateDraw, GateLayout, GateSample, HardConcreteGates
from smat_dist.smat.precision import full_precision


class MergePlan:
    """One gate draw, the tasks merged against it (by slot), and their deferred gate gradients.

    Test-time and gate-free plans (no stochastic draw) keep no state: any number of merges, in
    any order, each with plain gradients for θδ and α.
    """

    def __init__(
        self,
        layout: GateLayout,
        sample: Optional[GateSample | GateDraw],
        *,
        gates: Optional[HardConcreteGates] = None,
        capacity: int = 0,
        joint_backward: bool = False,
        fold_alpha: bool = False,
    ):
        self.layout = layout
        self.gates = gates if (sample is not None and sample.stochastic) else None
        if isinstance(sample, GateDraw) and self.gates is None:
            raise ValueError("a training gate draw (GateDraw) needs its gates")
        if isinstance(sample, GateSample) and sample.stochastic:
            raise ValueError("a training gate draw is a GateDraw (its noise keys), not gate values")
        # Given gate values (test time) or, for a training draw, its noise keys: z is recomputed.
        self.z = sample.z if isinstance(sample, GateSample) else None
        self.draw = sample if isinstance(sample, GateDraw) else None
        self.keys = None if self.draw is None else self.draw.keys
        self._flushed = False
        self.capacity = capacity  # expected tasks: their rows go into one preallocated block
        self.joint_backward = joint_backward
        self.tasks = 0  # merges recorded against this draw (slots 0..tasks-1)
        self.closed = False  # the flushing (last) task has been merged
        self._alphas: Dict[int, torch.Tensor] = {}
        self._rows: Dict[int, torch.Tensor] = {}
        self._row_block: Optional[torch.Tensor] = None
        self._density_grad: Optional[torch.Tensor] = None  # ∂L/∂E, kept until the flush
        # ∇α inside the flush (gates.alpha_grad="flush"): per deferred slot, α and the selection logits
        # with their graphs to the hypernetwork, and the selection logits' gradient from the task's loss
        self.fold_alpha = fold_alpha
        self._deferred: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._selection_grads: Dict[int, torch.Tensor] = {}
        self.density: Optional[torch.Tensor] = None  # E_m of the last forward that asked for it

    @property
    def pending(self) -> int:
        """Tasks whose backward has arrived and waits for the flush."""
        return len(self._rows)

    @property
    def stochastic(self) -> bool:
        return self.gates is not None

    @property
    def flushed(self) -> bool:
        """∇φ of the draw has been formed: its tasks' deferred state is gone."""
        return self._flushed

    def open_slot(self, *, flush: bool, records: bool) -> int:
        """Register one task's merge (forward order); ``flush`` closes the plan."""
        if self.closed:
            raise RuntimeError(
                "merge: this gate draw's last task (flush=True) has already been merged; "
                "start a new MergePlan (SMAT.begin_step) for the next meta-step"
            )
        slot = -1
        if records:
            slot = self.tasks
            self.tasks += 1
        self.closed = flush
        return slot

    def links_gates(self, *, flush: bool) -> bool:
        """Whether this task's merge has φ as a graph input (see the module docstring)."""
        return self.joint_backward or flush

    def defer_alpha(self, slot: int, alpha: torch.Tensor, selection: Optional[torch.Tensor]) -> None:
        """Keep task ``slot``'s α (and selection logits) with their graphs: its ∇α comes from the flush,
        and their backward into the hypernetwork runs there, in slot order."""
        self._deferred[slot] = (alpha, selection)

    def defers(self, slot: int) -> bool:
        return slot in self._deferred

    def record_selection_grad(self, slot: int, grad: Optional[torch.Tensor]) -> None:
        if grad is not None:
            self._selection_grads[slot] = grad

    def require_draw(self) -> None:
        """Raise if the draw is gone: a backward after the flush cannot be correct."""
        if self.flushed:
            raise RuntimeError(
                "merge: backward of a task after its step's gate gradient was formed; each task of "
                "a MergePlan can be "
                "backpropagated once, and all of them before the plan's last backward"
            )

    def _store(self, slot: int, alpha: torch.Tensor, row: torch.Tensor) -> None:
        if slot in self._rows:
            raise RuntimeError(f"merge: task slot {slot} of this gate draw was backpropagated twice")
        if slot < self.capacity:  # straight into one (capacity, G) block: no stacking copy
            if self._row_block is None:
                self._row_block = torch.empty(self.capacity, row.shape[0], dtype=row.dtype, device=row.device)
            self._row_block[slot].copy_(row)
            row = self._row_block[slot]
        self._alphas[slot] = alpha
        self._rows[slot] = row

    def _stacked_rows(self) -> torch.Tensor:
        count = len(self._rows)
        if self._row_block is not None and count <= self.capacity:
            return self._row_block[:count]  # slots 0..count-1, written in place
        return torch.stack([self._rows[slot] for slot in range(count)])

    def gate_grad(
        self,
        slot: int,
        alpha: torch.Tensor,
        row: torch.Tensor,
        *,
        linked: bool,
        delta: torch.Tensor,
        density_grad: Optional[torch.Tensor],
        alpha_params: Sequence[torch.Tensor] = (),
    ) -> Optional[Tuple[torch.Tensor, Optional[list]]]:
        """(∂L/∂φ, the deferred tasks' gradient of ``alpha_params``) if this backward completes the
        plan, else None (deferred).

        ``row`` is θδ⊙G reduced to groups (interpolated experts) or G itself (independent
        experts); ``density_grad`` the gradient of the expected density E, if this task returned it.
        """
        self._store(slot, alpha, row)
        if density_grad is not None:
            self._density_grad = density_grad if self._density_grad is None else self._density_grad + density_grad
        complete = self.closed and len(self._rows) == self.tasks
        if complete and linked:
            return self._flush(delta, alpha_params)
        if not complete and (not linked or self.joint_backward):
            return None  # a later backward completes the plan and returns ∇φ
        waiting = sorted(set(range(self.tasks)) - set(self._rows))
        raise RuntimeError(
            "merge: the gate gradient of a meta-step is formed in the backward of its last task "
            f"(flush=True), but task(s) {waiting} (by merge order) of the same gate draw have not "
            "been backpropagated yet (e.g. one backward over the summed losses of the step). "
            "Backpropagate each earlier task first, or create the plan with joint_backward=True "
            "(SMAT.begin_step(..., joint_backward=True)) for any order."
            if not complete
            else "merge: the backward completing this gate draw belongs to a task not linked to "
            "the gate logits; with joint_backward=False the last task (flush=True) must be "
            "backpropagated last"
        )

    def _flush(self, delta: torch.Tensor, alpha_params: Sequence[torch.Tensor]):
        """∇φ (M, G) in one fused pass over the gates (smat_dist.smat.gates, ``flush_grad``), with the
        deferred tasks' ∇α from the same pass and their backward into ``alpha_params``."""
        gates = self.gates
        row_stack = self._stacked_rows()  # (B, G) or (B, N)
        alphas = torch.stack([self._alphas[slot] for slot in range(len(self._alphas))]).to(row_stack.dtype)  # (B, M)
        if delta.shape[0] > 1:  # independent experts: expert m sees θδ_m ⊙ G_t; unchunked is fine
            row_stack = self.layout.reduce((alphas.t() @ row_stack).mul_(delta))  # (M, G)
            alphas = torch.eye(delta.shape[0], dtype=row_stack.dtype, device=row_stack.device)
        param_grads = None
        if self._deferred:
            grad_phi, alpha_grads = gates.flush_grad(self.keys, alphas, row_stack, self._density_grad,
                                                     with_alpha_grad=True)
            param_grads = self._alpha_backward(alpha_grads, alpha_params)
        else:
            grad_phi = gates.flush_grad(self.keys, alphas, row_stack, self._density_grad)
        self._flushed = True
        self._alphas.clear()
        self._rows.clear()
        self._row_block = None
        self._density_grad = None
        self._deferred.clear()
        self._selection_grads.clear()
        return grad_phi, param_grads

    def _alpha_backward(self, alpha_grads: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
        """The deferred tasks' backward from (α_t, selection logits_t) into ``params``, one task at a
        time in slot order and summed in that order: the same arithmetic as when each task's own
        backward accumulated its share into the parameters' .grad."""
        if not params:
            raise RuntimeError("merge: tasks deferred their ∇α to the flush, but the flushing merge was given "
                               "no alpha_params to return their gradient through")
        total: list = [None] * len(params)
        for slot in sorted(self._deferred):
            alpha, selection = self._deferred[slot]
            roots, grads = [alpha], [alpha_grads[slot].to(alpha.dtype)]
            selection_grad = self._selection_grads.get(slot)
            if selection is not None and selection_grad is not None:
                roots.append(selection)
                grads.append(selection_grad.to(selection.dtype))
            parts = torch.autograd.grad(roots, params, grads, allow_unused=True)
            for i, part in enumerate(parts):
                if part is not None:
                    total[i] = part if total[i] is None else total[i] + part
        return total


def _compute_dtype(delta: torch.Tensor) -> torch.dtype:
    """The merge's precision: fp32 (even for bf16 inputs), fp64 for an fp64 model."""
    return torch.float64 if delta.dtype == torch.float64 else torch.float32


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, logits, alpha, pre, selection, plan: MergePlan, slot: int, linked: bool,
                with_density: bool, *alpha_params):
        ctx.plan, ctx.slot, ctx.linked = plan, slot, linked
        ctx.with_density, ctx.passes_selection = with_density, selection is not None
        ctx.alpha_params = alpha_params
        z, keys = plan.z, plan.keys
        density = None
        if delta.shape[0] == 1:  # interpolated experts share θδ
            if keys is not None:  # a training draw: z recomputed inside the fused merge pass
                per_group, density = plan.gates.merge_mask(plan.draw, alpha, with_density=with_density)
                mask = plan.layout.expand(per_group.to(delta.dtype))
            elif z is None:
                mask = alpha.sum().expand(pre.shape[0])
            else:
                mask = plan.layout.expand(alpha.to(z.dtype) @ z)
            theta = torch.addcmul(pre, mask, delta[0])
            ctx.save_for_backward(delta, alpha, mask)
        else:  # independent experts θδ_m: z materialised for this node only (θδ is (M, N) anyway)
            if keys is not None:
                z = plan.gates.draw(keys)
                if with_density:
                    density = plan.gates.density_value()
            weights = delta if z is None else delta * plan.layout.expand(z.to(delta.dtype))
            theta = pre + alpha.to(weights.dtype) @ weights
            ctx.save_for_backward(delta, alpha, None)
        outputs = (theta,)
        if with_density:
            plan.density = density
            outputs += (density.clone(),)
        if selection is not None:  # passed through: its gradient reaches this node's backward
            outputs += (selection.clone(),)
        return outputs if len(outputs) > 1 else theta

    @staticmethod
    def backward(ctx, grad, *more):
        more = list(more)
        grad_density = more.pop(0) if ctx.with_density else None
        grad_selection = more.pop(0) if ctx.passes_selection else None
        with full_precision(grad.device):
            grads = _Merge._backward(ctx, grad.to(_compute_dtype(ctx.saved_tensors[0])), grad_density, grad_selection)
        return grads

    @staticmethod
    def _backward(ctx, grad, grad_density, grad_selection):
        delta, alpha, mask = ctx.saved_tensors
        plan: MergePlan = ctx.plan
        plan.require_draw()
        z, keys = plan.z, plan.keys
        need_delta, need_logits, need_alpha = ctx.needs_input_grad[:3]
        grad_delta = grad_logits = grad_alpha = None
        param_grads = None
        if delta.shape[0] == 1:
            if need_delta:
                grad_delta = (mask * grad).unsqueeze(0)
            scaled = delta[0] * grad  # θδ ⊙ G_t
            if keys is not None:
                per_group = plan.layout.reduce(scaled)
                deferred = plan.defers(ctx.slot)
                if deferred:
                    plan.record_selection_grad(ctx.slot, grad_selection)
                elif need_alpha:
                    grad_alpha = plan.gates.alpha_grad(keys, per_group).to(alpha.dtype)
                flushed = plan.gate_grad(ctx.slot, alpha.detach(), per_group, linked=ctx.linked, delta=delta,
                                         density_grad=grad_density, alpha_params=ctx.alpha_params)
                if flushed is not None:
                    grad_logits, param_grads = flushed
            elif z is None:
                grad_alpha = scaled.sum().expand(alpha.shape[0]).to(alpha.dtype)
            else:
                grad_alpha = (z.to(scaled.dtype) @ plan.layout.reduce(scaled)).to(alpha.dtype)
        else:
            if keys is not None:
                z = plan.gates.draw(keys)
            expanded_z = None if z is None else plan.layout.expand(z.to(delta.dtype))
            if need_delta:
                grad_delta = alpha[:, None].to(grad.dtype) * grad[None, :]
                if expanded_z is not None:
                    grad_delta = grad_delta * expanded_z
            weights = delta if expanded_z is None else delta * expanded_z
            grad_alpha = (weights @ grad).to(alpha.dtype)
            if keys is not None:
                flushed = plan.gate_grad(ctx.slot, alpha.detach(), grad, linked=ctx.linked,
                                         delta=delta, density_grad=grad_density)
                grad_logits = None if flushed is None else flushed[0]
        if not need_alpha:
            grad_alpha = None
        if not need_logits:
            grad_logits = None
        if param_grads is None:
            param_grads = [None] * len(ctx.alpha_params)
        return (grad_delta, grad_logits, grad_alpha, None, None, None, None, None, None, *param_grads)


def merge(
    pre: torch.Tensor,
    delta: torch.Tensor,
    logits: Optional[torch.Tensor],
    alpha: torch.Tensor,
    plan: MergePlan,
    *,
    flush: bool = True,
    with_density: bool = False,
    selection: Optional[torch.Tensor] = None,
    alpha_params: Sequence[torch.Tensor] = (),
):
    """Flat task weights θ_t (fp32; fp64 for an fp64 θδ); with ``with_density`` also the experts' expected density E (M,).

    ``flush`` marks the last task merged against a training ``plan`` (set it False for the
    others); a single-task or test-time plan keeps the default. A loss term built from the
    returned E has its gradient folded into the flush's ∇φ.

    ``alpha_params``: the parameters α is computed from (the hypernetwork's). Given, and the plan
    folds ∇α into its flush (``fold_alpha``), this task's ∇α is formed in the flush pass instead of a
    pass of its own, and α's backward into ``alpha_params`` runs there (returned through the linked
    merge, so their gradient hooks run once per step). ``selection`` (M,): the hypernetwork's other
    output, whose loss terms must then also reach the flush: it is passed through this node.
    With ``selection`` the return value is (θ_t, E or None, selection).
    """
    if with_density and (not plan.stochastic or not flush):
        raise ValueError("with_density needs a training gate draw and the flushing task")
    device = pre.device
    if logits is None:
        logits = torch.zeros((), device=device)  # placeholder input, never gets a gradient
    slot, linked = -1, False
    given_selection = selection
    params: tuple = ()
    if plan.stochastic:
        records = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (delta, logits, alpha))
        slot = plan.open_slot(flush=flush, records=records)
        linked = plan.links_gates(flush=flush)
        if not linked:
            # Deferred tasks leave φ out of the graph: hooks on φ (ZeRO-2's gradient reduction)
            # must see one gradient per step, not a None per task.
            logits = logits.detach()
        folds = plan.fold_alpha and plan.keys is not None and delta.shape[0] == 1 and len(alpha_params) > 0
        if folds and linked:
            params = tuple(alpha_params)
        if folds and records and alpha.requires_grad:
            plan.defer_alpha(slot, alpha, selection)
            alpha = alpha.detach()
            selection = None if selection is None else selection.detach()
        else:
            selection = None  # not deferred: the selection logits keep their own graph
    with full_precision(device):
        out = _Merge.apply(delta, logits, alpha.to(_compute_dtype(delta)), pre, selection, plan, slot, linked,
                           with_density, *params)
    if given_selection is None:
        return out
    theta, density = (out[0], out[1]) if with_density else ((out[0] if selection is not None else out), None)
    return theta, density, (out[-1] if selection is not None else given_selection)
