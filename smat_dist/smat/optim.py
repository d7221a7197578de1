"""The reference's two optimisers as one, per-group clipping, and the epoch-wise LR schedule.

The reference steps SGD (θδ with momentum and coupled weight decay; gate logits at lr 1e6; λ) and
AdamW (hypernetwork) together after every meta-batch. One optimiser with a per-group update rule
is equivalent and is what DeepSpeed accepts as a client optimiser. Each group clips its own
gradient norm before its update (D13: gate logits at 5, hypernetwork at 1, θδ and λ not at all).
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
        for g in self.param_groups:
            if g["base_lr"] is None:
                g["base_lr"] = g["lr"]
        self.norm_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.last_grad_norms: Dict[str, float] = {}

    @torch.no_grad()
    def clip_group_(self, group: dict) -> Optional[float]:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if self.norm_reducer is not None:
            sq = self.norm_reducer(sq)
        norm = sq.sqrt()
        if group["max_norm"] is not None:
            coef = (group["max_norm"] / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
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
                for p in group["params"]:
                    p.clamp_(min=0.0)
        return loss

    def _sgd(self, group: dict) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if wd:
                d = d.add(p, alpha=wd)
            if mom:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            p.mul_(1.0 - lr * wd)
            state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def build_optimizer(groups: Dict[str, list], cfg: OptimConfig, lagrange_lr: float, project_lambda: bool) -> SMATOptimizer:
    """Reference §7.2–7.4 param groups from :meth:`SMAT.trainable_parameters`."""
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
    w, total = cfg.warmup_epochs, cfg.total_epochs
    if epoch < w:
        return epoch / max(1, w)
    progress = (epoch - w) / max(1, total - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def apply_schedule(opt: torch.optim.Optimizer, epoch: int, cfg: OptimConfig) -> float:
    """Set every group's lr for ``epoch``; returns the multiplier."""
    mult = lr_multiplier(epoch, cfg)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * mult
        if epoch == 0 and cfg.first_epoch_abs_lr is not None and g.get("rule") == "sgd":
            g["lr"] = cfg.first_epoch_abs_lr  # D7: the reference's epoch-0 override
    return mult


def count_trainable(model) -> Dict[str, int]:
    """Trainable values per optimiser group of a :class:`~smat_dist.smat.SMAT`, their total, and |θ_pre|."""
    groups = model.trainable_parameters()
    out = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    out["total"] = sum(out.values())
    out["theta_pre"] = model.space.numel
    return out
