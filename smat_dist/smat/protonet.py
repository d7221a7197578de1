"""ProtoNet pieces: class prototypes and the scaled cosine classifier, both in fp32.

Both are reductions over the feature dimension or the support set, so they run with autocast
off whatever region their caller is in; bf16 backbone features are cast up first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smat_dist.episode import num_ways
from smat_dist.smat.precision import full_precision

__all__ = ["cosine_logits", "num_ways", "prototypes"]


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int, *, check: bool = True) -> torch.Tensor:
    """Class means (ways, D) of ``features`` (S, D), fp32; every class must have >= 1 example.

    ``check=False`` skips the host-side test of that (a device synchronisation): meta-training passes
    it inside a meta-step, where a class without examples gives a NaN prototype, a non-finite loss and
    the step's one finiteness check fails instead.
    """
    with full_precision(features.device):
        features = features.float()
        classes = torch.arange(ways, device=labels.device)
        onehot = (labels[:, None] == classes[None, :]).to(features.dtype)  # (S, C); F.one_hot would sync
        counts = onehot.sum(0)
        if check and bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"support set has no example of class(es) {missing}")
        return (onehot.t() @ features) / counts[:, None]


def cosine_logits(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · cos(f, w)`` for every (example, class) pair: (Q, C), fp32."""
    with full_precision(features.device):
        normed_features = F.normalize(features.float(), dim=-1, eps=1e-12)
        normed_weights = F.normalize(weights.float(), dim=-1, eps=1e-12)
        return scale * normed_features @ normed_weights.t()
