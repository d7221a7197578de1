"""Where bf16 is allowed: the backbone's forward and backward, nothing else.

``model.precision = bf16`` (or ``auto`` on CUDA) runs the backbone under autocast: its matmuls in
bf16, its norms and softmax in fp32, and the gradient reaching θ_t in fp32 (autocast's casts
return gradients in the parameter's dtype). That is where the time goes and where bf16 is safe.

What SMAT adds around the backbone is either tiny or a long sum, and bf16 (8 significant bits,
relative spacing 2^-8) would be visible in every one of them: the merged mask Σ_m α_m z_m (a
length-M dot product per parameter), the hypernetwork's logits and its relaxed-Bernoulli noise,
the gate draw and sparsity counts, prototypes (class means), the cosine head and the losses. All
of those run in fp32 under :func:`full_precision`, with their inputs cast explicitly, whatever
autocast region their caller happens to be in.
"""

from __future__ import annotations

import contextlib

import torch


def backbone_autocast(precision: str, device: torch.device | str):
    """The backbone's autocast region for a ``precision`` setting: bf16 for ``bf16`` (on CPU too: CPU
    autocast lowers the same matmuls, so a CPU run shows what a GPU run computes) and for ``auto`` on
    CUDA; otherwise no autocast. Training, evaluation and the step benchmark all decide here."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device | str) -> torch.autocast:
    """A region in which autocast is off for ``device``'s type: every op runs in its inputs' dtype."""
    return torch.autocast(torch.device(device).type, enabled=False)
