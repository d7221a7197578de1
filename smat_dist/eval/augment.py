"""Support-set augmentation for test-time fine-tuning (the ``--aug`` option of the published SMAT
code, DiffAugment-style).

Per call, with probability ``prob``: one horizontal flip of the whole batch (p 0.5), then per image
brightness ``+U(-0.5, 0.5)``, saturation ``×U(0, 2)`` around the per-pixel channel mean, contrast
``×U(0.5, 1.5)`` around the image mean, and a translation of up to ``±translate`` of the side with
zero fill. Applied to the normalised batch (as the published code does, so the jitter ranges are
in normalised units), without gradient.

Every draw comes from a CPU ``torch.Generator`` seeded per (episode, step), so the augmentation is
the same on any device and for any number of workers.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def support_augment(x: torch.Tensor, gen: torch.Generator, prob: float = 0.9, translate: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    u = torch.rand(2, generator=gen)
    per = torch.rand(n, 3, generator=gen)
    s_h, s_w = int(h * translate + 0.5), int(w * translate + 0.5)
    ty = torch.randint(-s_h, s_h + 1, (n,), generator=gen)
    tx = torch.randint(-s_w, s_w + 1, (n,), generator=gen)
    if float(u[0]) >= prob:
        return x
    if float(u[1]) < 0.5:
        x = x.flip(-1)
    per = per.to(x.device, x.dtype)
    x = x + (per[:, 0] - 0.5).view(n, 1, 1, 1)  # brightness
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (2.0 * per[:, 1]).view(n, 1, 1, 1) + mean_c  # saturation
    mean_i = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_i) * (per[:, 2] + 0.5).view(n, 1, 1, 1) + mean_i  # contrast
    if s_h or s_w:
        x = translate_zero(x, ty.to(x.device), tx.to(x.device), s_h, s_w)
    return x


def translate_zero(x: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Shift image i by (ty[i], tx[i]) pixels (|shift| <= pad), filling with zeros; one gather."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h))
    rows = torch.arange(h, device=x.device)[None, :] + pad_h - ty[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + pad_w - tx[:, None]  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


__all__ = ["support_augment", "translate_zero"]
