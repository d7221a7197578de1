"""Hard-concrete (L0) expert gates z_m with their expected-L0 penalty and measured sparsity.

Each of the M experts has one logit per gate group. Unstructured gates (the default) have one group
per scalar parameter; structured gates share one logit per input column of a 2-D weight and per
output channel of a conv weight (everything else stays element-wise). Sparsity is always counted in
parameters: a group of ``k`` scalars counts ``k`` times.

Everything here walks the (M, G) logits in column chunks of ~1 MB: with M·|θ| = 173M values for
ViT-S, a gate draw is a dozen element-wise ops, and doing each over the whole tensor makes them
memory-bound passes (seconds each on two cores), while a chunk stays in cache for all of them.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.precision import full_precision

CHUNK_ELEMENTS = 1 << 18  # per chunk, all experts together (~1 MB of fp32)


class GateLayout:
    """Maps every scalar of the flat parameter vector to its gate group."""

    def __init__(self, slots: Sequence[ParamSlot], *, structured: bool):
        self.numel = sum(slot.numel for slot in slots)
        if not structured:
            self.num_groups = self.numel
            self.group_index: Optional[torch.Tensor] = None
            self.group_sizes: Optional[torch.Tensor] = None
            return
        index_parts, sizes = [], []
        next_group = 0
        for slot in slots:
            shape = tuple(slot.shape)
            if len(shape) == 2:  # (out, in): one gate per input column
                rows, columns = shape
                index = torch.arange(columns).repeat(rows) + next_group
                sizes.append(torch.full((columns,), float(rows)))
                next_group += columns
            elif len(shape) == 4:  # conv (out, in, kh, kw): one gate per output channel
                channels = shape[0]
                per_channel = slot.numel // channels
                index = torch.arange(channels).repeat_interleave(per_channel) + next_group
                sizes.append(torch.full((channels,), float(per_channel)))
                next_group += channels
            else:  # norms, biases, cls token, position embedding: element-wise
                index = torch.arange(slot.numel) + next_group
                sizes.append(torch.ones(slot.numel))
                next_group += slot.numel
            index_parts.append(index)
        self.num_groups = next_group
        self.group_index = torch.cat(index_parts)
        self.group_sizes = torch.cat(sizes)

    def to(self, device: torch.device) -> "GateLayout":
        if self.group_index is not None:
            self.group_index = self.group_index.to(device)
            self.group_sizes = self.group_sizes.to(device)
        return self

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """Group values (..., G) -> per-scalar values (..., N)."""
        return per_group if self.group_index is None else per_group.index_select(-1, self.group_index)

    def reduce(self, per_scalar: torch.Tensor) -> torch.Tensor:
        """Per-scalar values (..., N) -> summed per group (..., G) (the adjoint of :meth:`expand`)."""
        if self.group_index is None:
            return per_scalar
        out = torch.zeros(*per_scalar.shape[:-1], self.num_groups, dtype=per_scalar.dtype, device=per_scalar.device)
        return out.index_add_(per_scalar.dim() - 1, self.group_index, per_scalar)

    def sizes(self, start: int, stop: int) -> Optional[torch.Tensor]:
        return None if self.group_sizes is None else self.group_sizes[start:stop]

    def count(self, per_group: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Sum over groups weighted by group size: (M, g) -> (M,) for groups start..start+g."""
        sizes = self.sizes(start, start + per_group.shape[-1])
        if sizes is None:
            return per_group.sum(-1)
        with full_precision(per_group.device):  # a count: never in bf16
            return per_group @ sizes.to(per_group.dtype)


def column_chunks(num_groups: int, num_experts: int) -> Iterator[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, num_experts))
    for start in range(0, num_groups, step):
        yield start, min(num_groups, start + step)


class UniformStream:
    """U(0, 1) draws for one seed, consumed column-major so chunking never changes them.

    The noise of (expert m, group g) is element ``g·M + m`` of the stream. On CPU it comes from
    NumPy's PCG64, ~2.5x faster than torch's serial Mersenne twister (a ViT-S gate draw needs
    173M numbers per meta-step); on GPU from a seeded torch generator.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self._rng = np.random.Generator(np.random.PCG64(seed))
        else:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(seed)

    def draw(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """(cols, rows) uniforms, from a (rows, cols) row-major draw, transposed and contiguous."""
        if self.device.type == "cpu":
            uniform = torch.from_numpy(self._rng.random((rows, cols), dtype=np.float32))
        else:
            uniform = torch.rand((rows, cols), generator=self._gen, device=self.device, dtype=torch.float32)
        return uniform.t().to(dtype).contiguous()


@dataclass
class GateSample:
    """One draw of all experts' gates."""

    z: torch.Tensor  # (M, G) in [0, 1]
    _: KW_ONLY
    sparsity: Optional[torch.Tensor] = None  # (M,) fraction of parameters whose gate is exactly 0
    stochastic: bool = True  # training draw (has a derivative) or test-time gates


class HardConcreteGates(nn.Module):
    def __init__(self, layout: GateLayout, cfg: GateConfig):
        super().__init__()
        self.layout = layout
        self.cfg = cfg
        logits = torch.empty(cfg.num_experts, layout.num_groups)
        nn.init.normal_(logits, cfg.logit_init_mean, cfg.logit_init_std)
        self.logits = nn.Parameter(logits)
        # Q(0; phi) = sigmoid(beta*log(-gamma/zeta) - phi): the CDF of the stretched gate at 0.
        self.l0_shift = cfg.beta * math.log(-cfg.gamma / cfg.zeta)
        if cfg.noise not in ("hard_concrete", "reference"):
            raise ValueError(f"gates.noise must be hard_concrete or reference, got {cfg.noise!r}")

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.layout.to(self.logits.device)
        return out

    def chunks(self) -> Iterator[Tuple[int, int]]:
        return column_chunks(self.layout.num_groups, self.num_experts)

    @torch.no_grad()
    def clamp_(self) -> None:
        clip = self.cfg.logit_clip
        self.logits.clamp_(-clip, clip)

    @torch.no_grad()
    def sample(self, seed: int) -> GateSample:
        """Training gates z = clamp(sigmoid((phi + l)/beta)(zeta-gamma) + gamma, 0, 1), l logistic noise.

        With ``l = log(u/(1-u))``: sigmoid((phi+l)/beta) = 1 / (1 + exp(-phi/beta)·((1-u)/u)^(1/beta)),
        one transcendental per gate instead of four (and a square root for the usual beta = 2/3).
        """
        cfg = self.cfg
        if cfg.noise == "hard_concrete":
            lo, hi = cfg.eps, 1.0 - cfg.eps
        else:  # the authors' U(0.5-eps, 0.5+eps), i.e. practically no noise (docs/algorithm.md#d1-gate-noise)
            lo, hi = 0.5 - cfg.eps, 0.5 + cfg.eps
        phi = self.logits.detach()
        z = torch.empty_like(phi)
        nonzero = torch.zeros(self.num_experts, dtype=torch.float64, device=phi.device)
        stretch = cfg.zeta - cfg.gamma
        inv_beta = 1.0 / cfg.beta
        stream = UniformStream(seed, phi.device)
        for start, stop in self.chunks():
            uniform = stream.draw(stop - start, self.num_experts, phi.dtype).mul_(hi - lo).add_(lo)
            odds = uniform.reciprocal_().sub_(1.0)  # (1-u)/u
            if abs(inv_beta - 1.5) < 1e-12:
                odds.mul_(odds.sqrt())
            else:
                odds.pow_(inv_beta)
            sig = odds.mul_(torch.exp(phi[:, start:stop] * -inv_beta)).add_(1.0).reciprocal_()
            z_chunk = sig.mul_(stretch).add_(cfg.gamma).clamp_(0.0, 1.0)
            z[:, start:stop] = z_chunk
            nonzero += self.layout.count((z_chunk > 0).to(z_chunk.dtype), start).double()
        return GateSample(z=z, sparsity=(1.0 - nonzero / self.layout.numel).to(phi.dtype), stochastic=True)

    def dz_dphi_(self, z: torch.Tensor) -> torch.Tensor:
        """dz/dphi of a training draw, from z alone (in place on a chunk copy).

        Inside (0, 1), z = s(zeta-gamma)+gamma with s = sigmoid((phi+l)/beta), so
        dz/dphi = (zeta-gamma)/beta · s(1-s); it is 0 where the hard clip is active.
        """
        cfg = self.cfg
        stretch = cfg.zeta - cfg.gamma
        inside = (z > 0) & (z < 1)
        sig = z.sub_(cfg.gamma).div_(stretch)
        return sig.mul_(1.0 - sig).mul_(stretch / cfg.beta).mul_(inside)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """Test-time gates z = clamp(sigmoid(phi / test_beta)(zeta-gamma) + gamma, 0, 1)."""
        cfg = self.cfg
        z = torch.sigmoid(self.logits.detach() / cfg.test_beta)
        return z.mul_(cfg.zeta - cfg.gamma).add_(cfg.gamma).clamp_(0.0, 1.0)

    @torch.no_grad()
    def test_sparsity(self) -> torch.Tensor:
        """Sparsity of the deterministic test gates, by threshold (no (M, G) temporary).

        z_test = 0  <=>  sigmoid(phi/test_beta) <= -gamma/(zeta-gamma)  <=>  phi <= test_beta·logit(...).
        """
        cfg = self.cfg
        p0 = -cfg.gamma / (cfg.zeta - cfg.gamma)
        threshold = cfg.test_beta * math.log(p0 / (1.0 - p0))
        phi = self.logits.detach()
        nonzero = torch.zeros(self.num_experts, dtype=torch.float64, device=phi.device)
        for start, stop in self.chunks():
            nonzero += self.layout.count((phi[:, start:stop] > threshold).to(phi.dtype), start).double()
        return (1.0 - nonzero / self.layout.numel).to(phi.dtype)

    @torch.no_grad()
    def sparsity(self, z: torch.Tensor) -> torch.Tensor:
        """Fraction of parameters whose gate is exactly zero, per expert: (M,)."""
        nonzero = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        for start, stop in column_chunks(z.shape[1], z.shape[0]):
            nonzero += self.layout.count((z[:, start:stop] > 0).to(z.dtype), start).double()
        return (1.0 - nonzero / self.layout.numel).to(z.dtype)

    @torch.no_grad()
    def density_value(self) -> torch.Tensor:
        """E_m = P(z != 0) averaged over parameters (no graph): (M,)."""
        eps = self.cfg.eps
        phi = self.logits.detach()
        total = torch.zeros(self.num_experts, dtype=torch.float64, device=phi.device)
        for start, stop in self.chunks():
            p_zero = torch.sigmoid(self.l0_shift - phi[:, start:stop]).clamp_(eps, 1 - eps)
            total += self.layout.count(p_zero.neg_().add_(1.0), start).double()
        return (total / self.layout.numel).to(phi.dtype)

    def density_grad_(self, out: torch.Tensor, coef: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``out += coef[:, None] · ∂E/∂phi`` for columns start..stop (``out`` is an (M, stop-start) chunk)."""
        eps = self.cfg.eps
        p_zero = torch.sigmoid(self.l0_shift - self.logits.detach()[:, start:stop])
        inside = (p_zero > eps) & (p_zero < 1 - eps)
        slope = p_zero.mul_(1.0 - p_zero).mul_(inside)  # d(1-q)/dphi = q(1-q) inside the clamp
        sizes = self.layout.sizes(start, stop)
        if sizes is not None:
            slope.mul_(sizes)
        return out.addcmul_(slope, (coef / self.layout.numel).to(slope.dtype)[:, None])

    def expected_density(self) -> torch.Tensor:
        """Differentiable E_m (M,): the expected-L0 penalty's closed form."""
        return _ExpectedL0.apply(self.logits, self)


class _ExpectedL0(torch.autograd.Function):
    """E_m with a chunked backward; used on its own (tests, metrics). Training folds the same
    gradient into the merge node (:mod:`smat_dist.smat.merge`) to avoid a second (M, G) buffer."""

    @staticmethod
    def forward(ctx, logits, gates: HardConcreteGates):
        ctx.gates = gates
        return gates.density_value()

    @staticmethod
    def backward(ctx, grad_out):
        gates: HardConcreteGates = ctx.gates
        grad = torch.zeros_like(gates.logits)
        for start, stop in gates.chunks():
            gates.density_grad_(grad[:, start:stop], grad_out, start, stop)
        return grad, None
