"""Distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill(student: torch.Tensor, target: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    """``T² · KL`` between softened distributions, averaged over examples ("batchmean").

    ``direction="reverse"`` is KL(student ‖ target), what the reference code computes (D5);
    ``"forward"`` is KL(target ‖ student), Hinton's distillation. Gradients reach ``student`` only.
    """
    t = temperature
    log_s = F.log_softmax(student / t, dim=-1)
    log_t = F.log_softmax(target.detach() / t, dim=-1)
    if direction == "reverse":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        raise ValueError(f"teacher.kl_direction must be reverse or forward, got {direction!r}")
    return kl.mean() * t * t
