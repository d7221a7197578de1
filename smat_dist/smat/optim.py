"""The reference's two optimisers as one, per-group clipping, and the epoch-wise LR schedule.

The reference steps SGD (θδ with momentum and coupled weight decay; gate logits at lr 1e6; λ) and
AdamW (hypernetwork) together after every meta-batch. One optimiser with a per-group update rule
is equivalent and is what DeepSpeed accepts as a client optimiser. Each group clips its own
gradient norm before its update: gate logits at 5, hypernetwork at 1, θδ and λ not at all
(docs/algorithm.md#d13-clipping).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from smat_dist.smat.config import OptimConfig


class SMATOptimizer(torch.optim.Optimizer):
    """Per-group ``rule`` in {"sgd", "adamw"}; ``max_norm`` clips the group; ``nonneg`` projects to >= 0.

    ``norm_reducer`` (set by the distributed layer for partitioned optimiser states) turns a local
    squared norm into the global one.
    """

    def __init__(self, groups: List[dict]):
        defaults = dict(
            rule="sgd", lr=1e-3, momentum=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
            max_norm=None, nonneg=False, name="", base_lr=None,
        )
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["base_lr"] is None:
                group["base_lr"] = group["lr"]
        self.norm_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.last_grad_norms: Dict[str, float] = {}

    @torch.no_grad()
    def clip_group_(self, group: dict) -> Optional[float]:
        grads = [param.grad for param in group["params"] if param.grad is not None]
        if not grads:
            return None
        # a reduction per tensor, no |grad|-sized temporary: the gate logits' grad is (M, G), 0.69 GB
        # at ViT-S, M = 8, and a pow(2) copy of it was the step's memory peak
        squared = torch.stack([torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]).pow(2).sum()
        if self.norm_reducer is not None:
            squared = self.norm_reducer(squared)
        norm = squared.sqrt()
        if group["max_norm"] is not None:
            coef = (group["max_norm"] / (norm + 1e-6)).clamp(max=1.0)
            # An inactive clip (the usual case: the gate logits' norm is ~1e-3 against 5) multiplies by
            # exactly 1: skipping it is bit-identical and saves a read-write pass over every (M, G) value.
            if float(coef) < 1.0:
                for grad in grads:
                    grad.mul_(coef.to(grad.dtype))
        return float(norm)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            norm = self.clip_group_(group)
            if norm is not None:
                self.last_grad_norms[group["name"]] = norm
            if group["rule"] == "sgd":
                self._sgd(group)
            elif group["rule"] == "adamw":
                self._adamw(group)
            else:
                raise ValueError(f"unknown update rule {group['rule']!r}")
            if group["nonneg"]:
                for param in group["params"]:
                    param.clamp_(min=0.0)
        return loss

    def _sgd(self, group: dict) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            direction = param.grad  # updated in place (the grad is not read after the step): no temporary
            if weight_decay:
                direction.add_(param, alpha=weight_decay)
            if momentum:
                state = self.state[param]
                velocity = state.get("momentum_buffer")
                if velocity is None:
                    velocity = state["momentum_buffer"] = direction.detach().clone()
                else:
                    velocity.mul_(momentum).add_(direction)
                direction = velocity
            param.add_(direction, alpha=-lr)

    def _adamw(self, group: dict) -> None:
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            step_count = float(state["step"])
            param.mul_(1.0 - lr * weight_decay)
            state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step_count)).sqrt_().add_(eps)
            param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step_count))


def build_optimizer(groups: Dict[str, list], cfg: OptimConfig, lagrange_lr: float, project_lambda: bool) -> SMATOptimizer:
    """The reference's parameter groups from :meth:`SMAT.trainable_parameters`: SGD for θδ (momentum,
    coupled weight decay), the gate logits and λ; AdamW for the hypernetwork."""
    spec = []
    if groups.get("delta"):
        spec.append(dict(params=groups["delta"], name="delta", rule="sgd", lr=cfg.delta_lr,
                         momentum=cfg.delta_momentum, weight_decay=cfg.delta_weight_decay, max_norm=cfg.delta_clip))
    if groups.get("masks"):
        spec.append(dict(params=groups["masks"], name="masks", rule="sgd", lr=cfg.mask_lr, max_norm=cfg.mask_clip))
    if groups.get("lagrange"):
        spec.append(dict(params=groups["lagrange"], name="lagrange", rule="sgd", lr=lagrange_lr, nonneg=project_lambda))
    if groups.get("hypernet"):
        spec.append(dict(params=groups["hypernet"], name="hypernet", rule="adamw", lr=cfg.hypernet_lr,
                         weight_decay=cfg.hypernet_weight_decay, betas=tuple(cfg.hypernet_betas), max_norm=cfg.hypernet_clip))
    return SMATOptimizer(spec)


def lr_multiplier(epoch: int, cfg: OptimConfig) -> float:
    """Cosine schedule with linear warm-up, in epochs (HF ``get_cosine_schedule_with_warmup``)."""
    warmup, total = cfg.warmup_epochs, cfg.total_epochs
    if epoch < warmup:
        return epoch / max(1, warmup)
    progress = (epoch - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


CONSTRAINT_GROUPS = ("lagrange", "masks")  # the groups that enforce the sparsity constraint


def apply_schedule(opt: torch.optim.Optimizer, epoch: int, cfg: OptimConfig) -> float:
    """Set every group's lr for ``epoch``; returns the common multiplier. After warm-up the constraint's
    groups (λ, gate logits) keep at least ``cfg.constraint_lr_floor`` of their base lr
    (docs/algorithm.md#d10-lagrange-multiplier)."""
    mult = lr_multiplier(epoch, cfg)
    floored = max(mult, cfg.constraint_lr_floor) if epoch >= cfg.warmup_epochs else mult
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * (floored if group.get("name") in CONSTRAINT_GROUPS else mult)
        if epoch == 0 and cfg.first_epoch_abs_lr is not None and group.get("rule") == "sgd":
            group["lr"] = cfg.first_epoch_abs_lr  # the authors' epoch-0 override (docs/algorithm.md#d7-first-epoch-lr)
    return mult


def count_trainable(model) -> Dict[str, int]:
    """Trainable values per optimiser group of a :class:`~smat_dist.smat.SMAT`, their total, and |θ_pre|."""
    groups = model.trainable_parameters()
    out = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    out["total"] = sum(out.values())
    out["theta_pre"] = model.space.numel
    return out
