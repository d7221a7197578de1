"""Counter-based uniform noise: u(seed, m, g) is a pure function, computed where it is used, never stored.

The hard-concrete gates of a meta-step need one uniform per (expert m, gate group g): 173M numbers for
ViT-S/16 with M = 8. A stateful generator would have to produce them in one order and store them (an
(M, G) buffer alive for the whole step). A counter-based generator instead computes the noise of any
(m, g) from its coordinates, so every pass over the gates (count, merge, ∇α, flush) regenerates exactly
the values it needs, in any chunking, on any device (docs/algorithm.md#noise-generator).

The generator is a keyed integer hash in the style of Philox/Squares: expert m gets two 32-bit keys
derived from (seed, m) on the host (NumPy's SeedSequence); the counter g is mixed with the first key by
a bijective 32-bit mixer (xor-shift / multiply, the "lowbias32" constants), then with the second key by
the same mixer. Everything is int32 arithmetic (wrapping multiplication, masked shifts), which CPUs, CUDA
and compiled kernels evaluate bit-identically, and the top 23 bits k become u = (k + ½)·2⁻²³, a float32 in
(0, 1) without rounding.
"""

from __future__ import annotations

import numpy as np
import torch

_MUL1 = 0x7FEB352D - (1 << 32) if 0x7FEB352D >= 1 << 31 else 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # as a wrapped int32


def expert_keys(seed: int, num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(M, 2) int32 keys of one noise stream: expert m's keys from SeedSequence([seed lo, seed hi, m])."""
    seed = int(seed) & ((1 << 64) - 1)
    words = [np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, m]).generate_state(2, dtype=np.uint32)
             for m in range(num_experts)]
    return torch.from_numpy(np.stack(words).view(np.int32).copy()).to(device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words (int32, wrapping); ``(x >> k) & mask`` is a logical shift."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def counter_bits(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """(M, count) int32 random words for counters start..start+count of each expert's keys (M, 2)."""
    g = torch.arange(count, dtype=torch.int32, device=keys.device) + start
    x = _mix(g[None, :] ^ keys[:, 0:1])
    return _mix(x ^ keys[:, 1:2])


def counter_uniform(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """(M, count) float32 uniforms in (0, 1): ((top 23 bits) + ½) · 2⁻²³, exactly representable."""
    bits = (counter_bits(keys, start, count) >> 9) & 0x7FFFFF
    return bits.to(torch.float32) * (2.0 ** -23) + (2.0 ** -24)
