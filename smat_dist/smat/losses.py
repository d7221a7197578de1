"""Distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill(student: torch.Tensor, target: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    """``T² · KL`` between softened distributions, averaged over examples ("batchmean").

    ``direction="reverse"`` is KL(student ‖ target), what the authors' code computes
    (docs/algorithm.md#d5-distillation);
    ``"forward"`` is KL(target ‖ student), Hinton's distillation. Gradients reach ``student`` only.
    """
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_target = F.log_softmax(target.detach() / temperature, dim=-1)
    if direction == "reverse":
        kl = (log_student.exp() * (log_student - log_target)).sum(-1)
    elif direction == "forward":
        kl = (log_target.exp() * (log_target - log_student)).sum(-1)
    else:
        raise ValueError(f"teacher.kl_direction must be reverse or forward, got {direction!r}")
    return kl.mean() * temperature * temperature
