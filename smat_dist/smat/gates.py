"""Hard-concrete (L0) expert gates z_m with their expected-L0 penalty and measured sparsity.

Each of the M experts has one logit per gate group. Unstructured gates (the default) have one group
per scalar parameter; structured gates share one logit per input column of a 2-D weight and per
output channel of a conv weight (everything else stays element-wise). Sparsity is always counted in
parameters: a group of ``k`` scalars counts ``k`` times.

A training draw is never stored: its noise comes from a counter-based generator
(:mod:`smat_dist.smat.noise`), so each pass over the gates recomputes the z it reads. The work of a
meta-step is a handful of such passes over the (M, G) logits, each one fused computation
(``_pass_*`` below): the count (measured sparsity; eagerly, inside the step's first merge), the merge
(+ expected density), ∇α (inside the flush with ``alpha_grad=flush``), and the flush
(∇φ with the expected-L0 gradient). With M·|θ| = 173M gates for ViT-S, M = 8, a pass made of a dozen
separate element-wise ops would be a dozen memory-bound sweeps (or, chunked, tens of thousands of
kernel launches on a GPU), so each pass runs either

* compiled (``gates.kernel=compiled``, or ``auto`` from :data:`COMPILE_MIN_GATES` gates on): one
  torch.compile/Inductor kernel over all columns (C++/OpenMP on CPU, Triton on GPU), a fixed number of
  launches whatever |θ|; or
* eagerly over column chunks (``eager``, small models, and the fallback when compiling fails):
  cache-sized on CPU, :data:`DEVICE_CHUNK_ELEMENTS` on an accelerator.
"""

from __future__ import annotations

import logging
import math
from dataclasses import KW_ONLY, dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.noise import counter_uniform, expert_keys
from smat_dist.smat.precision import full_precision

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 18  # eager CPU chunk, all experts together (~1 MB of fp32: stays in cache)
DEVICE_CHUNK_ELEMENTS = 1 << 26  # eager accelerator chunk (256 MB of fp32 per temporary)
COMPILE_MIN_GATES = 1 << 22  # gates.kernel=auto compiles the passes from this many gates (M·G) on


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


def column_chunks(num_groups: int, num_experts: int, device: Optional[torch.device] = None) -> Iterator[Tuple[int, int]]:
    """Column ranges of (M, G) gate tensors for the eager passes: cache-sized on CPU (every pass is a
    dozen element-wise ops, which stay in cache), large on an accelerator (fewer launches)."""
    budget = CHUNK_ELEMENTS if device is None or torch.device(device).type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, budget // max(1, num_experts))
    for start in range(0, num_groups, step):
        yield start, min(num_groups, start + step)


@dataclass
class GateSample:
    """Gates given as values: the deterministic test gates, or a training draw a test built by hand."""

    z: torch.Tensor  # (M, G) in [0, 1]
    _: KW_ONLY
    sparsity: Optional[torch.Tensor] = None  # (M,) fraction of parameters whose gate is exactly 0
    stochastic: bool = True  # training draw (has a derivative) or test-time gates


@dataclass
class GateDraw:
    """One training draw of all experts' gates, held as its noise keys: z is recomputed by every pass
    that reads it (docs/algorithm.md#noise-generator), so no (M, G) buffer exists during a step."""

    keys: torch.Tensor  # (M, 2) int32 counter-noise keys (smat_dist.smat.noise)
    _: KW_ONLY
    sparsity: Optional[torch.Tensor] = None  # (M,) fraction of parameters whose gate is exactly 0
    stochastic: bool = True
    count_in_merge: bool = False  # still to be measured: the first (eager) merge counts it in its own pass


class _Consts(NamedTuple):
    lo: float
    hi: float
    inv_beta: float
    stretch: float
    gamma: float
    eps: float
    l0_shift: float


def _hard_concrete(phi: torch.Tensor, keys: torch.Tensor, start: int, c: _Consts) -> torch.Tensor:
    """s = sigmoid((φ + l)/β) of the training draw, l = log(u/(1-u)) with u from the counter noise.

    sigmoid((φ+l)/β) = 1 / (1 + exp(-φ/β)·((1-u)/u)^(1/β)): one transcendental per gate (and a square
    root for the usual β = 2/3) instead of four.
    """
    u = counter_uniform(keys, start, phi.shape[-1]).to(phi.dtype) * (c.hi - c.lo) + c.lo
    odds = (1.0 - u) / u
    odds = odds * odds.sqrt() if abs(c.inv_beta - 1.5) < 1e-12 else odds.pow(c.inv_beta)
    return 1.0 / (1.0 + odds * torch.exp(phi * -c.inv_beta))


def _gate(s: torch.Tensor, c: _Consts) -> torch.Tensor:
    return (s * c.stretch + c.gamma).clamp(0.0, 1.0)


def _pass_draw(phi, keys, start, *, c):
    return (_gate(_hard_concrete(phi, keys, start, c), c),)


def _pass_count(phi, keys, start, sizes, *, c):
    """Parameters with a nonzero training gate, per expert (int64: exact, in any order)."""
    nonzero = (_gate(_hard_concrete(phi, keys, start, c), c) > 0).to(torch.int64)
    return ((nonzero if sizes is None else nonzero * sizes).sum(-1),)


def _pass_merge(phi, keys, start, alpha, sizes, *, c, with_density: bool, with_count: bool = False):
    """Σ_m α_m z_m per group (G,); with ``with_density`` the experts' Σ_g k_g·P(z ≠ 0); with
    ``with_count`` the draw's nonzero parameter counts (M,) (int64, :func:`_pass_count` in the same pass)."""
    mask = None
    counts = []
    for m in range(phi.shape[0]):  # expert by expert: one pointwise kernel over groups, no (M, G) temporary
        gate = _gate(_hard_concrete(phi[m : m + 1], keys[m : m + 1], start, c), c)[0]
        term = alpha[m] * gate
        mask = term if mask is None else mask + term
        if with_count:
            nonzero = (gate > 0).to(torch.int64)
            counts.append((nonzero if sizes is None else nonzero * sizes.to(torch.int64)).sum(-1))
    out = (mask,)
    if with_density:
        keep = 1.0 - torch.sigmoid(c.l0_shift - phi).clamp(c.eps, 1.0 - c.eps)
        if sizes is not None:
            keep = keep * sizes
        out += (keep.sum(-1),)
    if with_count:
        out += (torch.stack(counts),)
    return out


def _pass_alpha_grad(phi, keys, start, row, *, c):
    """<z_m, row> per expert (M,): ∇α of a task whose θδ⊙G reduced to groups is ``row``."""
    return ((_gate(_hard_concrete(phi, keys, start, c), c) * row[None, :]).sum(-1),)


def _pass_flush(phi, keys, start, alphas, rows, coef, sizes, *, c, with_alpha_grad: bool = False):
    """∂L/∂φ (M, g) = dz/dφ ⊙ Σ_t α_t,m row_t + coef_m·∂E_m/∂φ; with ``with_alpha_grad`` also every
    task's ∇α, <z_m, row_t> (B, M), from the same z (what :func:`_pass_alpha_grad` computes per task).

    dz/dφ = (ζ-γ)/β · s(1-s) where the hard clip is inactive; ∂E/∂φ = k_g·q(1-q)/|θ| inside the
    [eps, 1-eps] clamp of q = Q(0; φ) = sigmoid(l0_shift - φ). The task sum is written as a broadcast
    reduction over the (few) tasks so a compiled kernel fuses it (no (M, G) temporary).
    """
    s = _hard_concrete(phi, keys, start, c)
    z = s * c.stretch + c.gamma
    dz = s * (1.0 - s) * (c.stretch * c.inv_beta) * ((z > 0) & (z < 1))
    grad = (alphas.t()[:, :, None] * rows[None, :, :]).sum(1) * dz
    if coef is not None:
        q = torch.sigmoid(c.l0_shift - phi)
        slope = q * (1.0 - q) * ((q > c.eps) & (q < 1.0 - c.eps))
        if sizes is not None:
            slope = slope * sizes
        grad = grad + slope * coef[:, None]
    if not with_alpha_grad:
        return (grad,)
    gate = z.clamp(0.0, 1.0)  # = _gate(s): the same operations, so eagerly the same numbers as the ∇α pass
    return grad, torch.stack([(gate * rows[t][None, :]).sum(-1) for t in range(rows.shape[0])])


def _pass_test_count(phi, keys, start, sizes, *, c, threshold: float):
    """Parameters whose deterministic test gate is nonzero (φ above ``threshold``), per expert."""
    nonzero = (phi > threshold).to(torch.int64)
    return ((nonzero if sizes is None else nonzero * sizes).sum(-1),)


_PASSES = {"draw": _pass_draw, "count": _pass_count, "merge": _pass_merge, "alpha_grad": _pass_alpha_grad,
           "flush": _pass_flush, "test_count": _pass_test_count}
_COMPILED: dict = {}
_COMPILE_FAILED: set = set()


def _compiled(name: str):
    """The pass compiled once per process (dynamic shapes: one kernel for every G and M)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_PASSES[name], dynamic=True)
    return _COMPILED[name]


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
        if cfg.kernel not in ("auto", "compiled", "eager"):
            raise ValueError(f"gates.kernel must be auto, compiled or eager, got {cfg.kernel!r}")
        if cfg.noise == "hard_concrete":
            lo, hi = cfg.eps, 1.0 - cfg.eps
        else:  # the authors' U(0.5-eps, 0.5+eps), i.e. practically no noise (docs/algorithm.md#d1-gate-noise)
            lo, hi = 0.5 - cfg.eps, 0.5 + cfg.eps
        self._consts = _Consts(lo=lo, hi=hi, inv_beta=1.0 / cfg.beta, stretch=cfg.zeta - cfg.gamma,
                               gamma=cfg.gamma, eps=cfg.eps, l0_shift=self.l0_shift)

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.layout.to(self.logits.device)
        return out

    def chunks(self) -> Iterator[Tuple[int, int]]:
        return column_chunks(self.layout.num_groups, self.num_experts, self.logits.device)

    @property
    def compiled(self) -> bool:
        """Whether the gate passes run as compiled kernels (one launch per pass) or eager chunks."""
        kernel = self.cfg.kernel
        if kernel == "auto":
            return self.logits.numel() >= COMPILE_MIN_GATES
        return kernel == "compiled"

    def _sizes(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        sizes = self.layout.group_sizes
        return None if sizes is None else sizes.to(dtype)

    def _run(self, name: str, args: tuple, outs: Tuple[str, ...], keys: Optional[torch.Tensor] = None,
             **static) -> tuple:
        """Run pass ``name`` over every gate column: compiled in one call, or eagerly chunk by chunk.

        ``args``: (value, sliced) pairs; a sliced value is a (..., G) tensor cut with the logits' columns.
        Each output is "cols" (a (..., G) result written by columns) or "sum" (a per-expert total).
        """
        phi = self.logits.detach()
        fn = _PASSES[name]
        with torch.profiler.record_function(f"smat.gates.{name}"):
            if self.compiled and name not in _COMPILE_FAILED:
                try:
                    return _compiled(name)(phi, keys, 0, *[value for value, _ in args], c=self._consts, **static)
                except Exception as err:  # e.g. no C++ compiler or Triton: the same math, eagerly
                    _COMPILE_FAILED.add(name)
                    log.warning("gate pass %s: torch.compile failed (%s); running it eagerly", name,
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            results: list = []
            for start, stop in self.chunks():
                chunk_args = [value[..., start:stop] if sliced and value is not None else value for value, sliced in args]
                part = fn(phi[:, start:stop], keys, start, *chunk_args, c=self._consts, **static)
                if not results:
                    results = [torch.empty(*p.shape[:-1], phi.shape[1], dtype=p.dtype, device=p.device)
                               if kind == "cols" else torch.zeros_like(p) for p, kind in zip(part, outs)]
                for out, p, kind in zip(results, part, outs):
                    if kind == "cols":
                        out[..., start:stop] = p
                    else:
                        out += p
            return tuple(results)

    def _counted(self, nonzero: torch.Tensor) -> torch.Tensor:
        """Sparsity (M,) from nonzero parameter counts (int64)."""
        return (1.0 - nonzero.double() / self.layout.numel).to(self.logits.dtype)

    @torch.no_grad()
    def clamp_(self) -> None:
        clip = self.cfg.logit_clip
        self.logits.clamp_(-clip, clip)

    def keys(self, seed: int) -> torch.Tensor:
        """(M, 2) int32 noise keys of the draw ``seed`` (one draw = one key set, smat_dist.smat.noise)."""
        return expert_keys(seed, self.num_experts, self.logits.device)

    @torch.no_grad()
    def sample(self, seed: int, *, measure: bool = True) -> GateDraw:
        """Training draw ``seed``: its keys and (``measure``) its measured sparsity (one counting pass,
        z not kept). Unmeasured, the first merge against it counts it in its own pass (:meth:`merge_mask`).

        z = clamp(sigmoid((φ + l)/β)(ζ-γ) + γ, 0, 1) with logistic noise l = log(u/(1-u)), u uniform in
        [lo, hi] from the counter noise of (seed, expert, group).
        """
        draw = GateDraw(self.keys(seed), count_in_merge=not measure)
        if measure:
            self.measure(draw)
        return draw

    @torch.no_grad()
    def measure(self, draw: GateDraw) -> torch.Tensor:
        """The draw's sparsity (M,), counted in a pass of its own unless already known."""
        if draw.sparsity is None:
            (nonzero,) = self._run("count", ((self._sizes(torch.int64), True),), ("sum",), keys=draw.keys)
            draw.sparsity = self._counted(nonzero)
        return draw.sparsity

    @torch.no_grad()
    def draw(self, keys: torch.Tensor) -> torch.Tensor:
        """The training gates z (M, G) of a draw, materialised (tests, the independent-experts merge)."""
        return self._run("draw", (), ("cols",), keys=keys)[0]

    @torch.no_grad()
    def merge_mask(self, draw: GateDraw, alpha: torch.Tensor, *, with_density: bool = False):
        """Σ_m α_m z_m per group (G,) of a draw; with ``with_density`` also E_m (M,) in the same pass.

        A draw still to be measured (``sample(..., measure=False)``) is counted in the same pass too
        when the passes run eagerly: the step's first merge measures it, and the count pass
        never runs. Compiled, the count keeps its own pass: Inductor does not fuse the per-expert counts
        into the merge's kernel, and together they took longer than apart (docs/performance.md#gate-passes).
        """
        with_count = draw.count_in_merge and draw.sparsity is None and not self.compiled
        outs = ("cols",) + (("sum",) if with_density else ()) + (("sum",) if with_count else ())
        res = self._run("merge", ((alpha.to(self.logits.dtype), False), (self._sizes(self.logits.dtype), True)),
                        outs, keys=draw.keys, with_density=with_density, with_count=with_count)
        if with_count:
            draw.sparsity = self._counted(res[-1])
        if not with_density:
            return res[0], None
        return res[0], (res[1] / self.layout.numel).to(self.logits.dtype)

    @torch.no_grad()
    def alpha_grad(self, keys: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """<z_m, row> (M,) for a draw and a per-group vector ``row`` (G,)."""
        return self._run("alpha_grad", ((row.to(self.logits.dtype), True),), ("sum",), keys=keys)[0]

    @torch.no_grad()
    def flush_grad(self, keys: torch.Tensor, alphas: torch.Tensor, rows: torch.Tensor,
                   density_coef: Optional[torch.Tensor], *, with_alpha_grad: bool = False):
        """∂L/∂φ (M, G) of a draw: dz/dφ ⊙ (αᵀ rows) + density_coef_m·∂E_m/∂φ, in one pass; with
        ``with_alpha_grad`` returns (∂L/∂φ, ∇α (B, M)): every task's <z_m, row_t> from the same pass.

        ``alphas`` (B, M), ``rows`` (B, G): the tasks' α and θδ⊙G reduced to groups (for independent
        experts: B = M, ``alphas`` the identity, ``rows`` the per-expert gradients);
        ``density_coef`` (M,) = ∂L/∂E or None.
        """
        dtype = self.logits.dtype
        coef = None if density_coef is None else (density_coef.to(dtype) / self.layout.numel)
        args = ((alphas.to(dtype), False), (rows.to(dtype), True), (coef, False), (self._sizes(dtype), True))
        outs = ("cols", "sum") if with_alpha_grad else ("cols",)
        res = self._run("flush", args, outs, keys=keys, with_alpha_grad=with_alpha_grad)
        return res if with_alpha_grad else res[0]

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
        (nonzero,) = self._run("test_count", ((self._sizes(torch.int64), True),), ("sum",), threshold=threshold)
        return self._counted(nonzero)

    @torch.no_grad()
    def sparsity(self, z: torch.Tensor) -> torch.Tensor:
        """Fraction of parameters whose gate is exactly zero, per expert: (M,)."""
        nonzero = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        for start, stop in column_chunks(z.shape[1], z.shape[0], z.device):
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
