"""ProtoNet pieces: class prototypes and the scaled cosine classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means (ways, D) of ``features`` (S, D); every class must have >= 1 example."""
    onehot = F.one_hot(labels, ways).to(features.dtype)  # (S, C)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"support set has no example of class(es) {missing}")
    return (onehot.t() @ features) / counts[:, None]


def cosine_logits(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · cos(f, w)`` for every (example, class) pair: (Q, C)."""
    f = F.normalize(features.float(), dim=-1, eps=1e-12)
    w = F.normalize(weights.float(), dim=-1, eps=1e-12)
    return scale * f @ w.t()
