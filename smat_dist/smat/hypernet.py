"""Hypernetwork h: support-set prototypes (under θ_pre) -> expert weights α_i.

Tokens ``[μ_0..μ_{C-1}, k_1..k_T]`` go through one pre-norm transformer block; the pooled output
``e_i`` scores the M expert keys; a relaxed-Bernoulli draw at temperature ``T_sel`` (deterministic
sigmoid at test) is normalised to α_i. Unlike the authors' code (docs/algorithm.md#d2-keys-tokens) the
keys and skill tokens are registered parameters: they are trained by the hypernetwork's AdamW and saved
in checkpoints.

Spectral normalisation wraps every linear layer, as in the reference, but its power iteration runs
once per meta-step (:meth:`Hypernetwork.power_iteration_`) rather than once per forward, so the
estimate does not depend on how a meta-batch is spread over workers.

The whole network runs in fp32 with autocast off (:mod:`smat_dist.smat.precision`): it is a few
(C+T, D) matmuls, and α, the selection logits and their relaxed-Bernoulli noise must not be bf16
(the noise's log(u) - log(1-u) is the first thing bf16 truncates).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.smat.config import HypernetConfig
from smat_dist.smat.precision import full_precision


class SpectralLinear(nn.Module):
    """Linear layer whose weight is divided by its largest singular value (power-iteration estimate)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, spectral: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.spectral = spectral
        if spectral:
            self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0, eps=1e-12))
            self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0, eps=1e-12))
            self.power_iteration_(15)  # as torch's spectral_norm does at registration

    @torch.no_grad()
    def power_iteration_(self, iterations: int = 1) -> None:
        if not self.spectral:
            return
        weight = self.weight.detach()
        with full_precision(weight.device):
            for _ in range(iterations):
                self.u.copy_(F.normalize(weight @ self.v, dim=0, eps=1e-12))
                self.v.copy_(F.normalize(weight.t() @ self.u, dim=0, eps=1e-12))

    def effective_weight(self) -> torch.Tensor:
        if not self.spectral:
            return self.weight
        with full_precision(self.weight.device):  # σ = uᵀWv: under autocast W v would be bf16
            sigma = torch.dot(self.u, self.weight @ self.v)
            return self.weight / sigma

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.effective_weight(), self.bias)


class HyperBlock(nn.Module):
    """Pre-norm transformer block: qkv without bias, MLP D -> r·D -> D with GELU, no dropout."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, spectral: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hypernet: feature dim {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = SpectralLinear(dim, 3 * dim, bias=False, spectral=spectral)
        self.proj = SpectralLinear(dim, dim, spectral=spectral)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = SpectralLinear(dim, hidden, spectral=spectral)
        self.fc2 = SpectralLinear(hidden, dim, spectral=spectral)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (L, D)
        L, D = tokens.shape
        heads = self.num_heads
        query, key, value = self.qkv(self.norm1(tokens)).view(L, 3, heads, D // heads).permute(1, 2, 0, 3)
        attention = (query @ key.transpose(-1, -2)) * (D // heads) ** -0.5
        mixed = (attention.softmax(-1) @ value).transpose(0, 1).reshape(L, D)
        tokens = tokens + self.proj(mixed)
        return tokens + self.fc2(F.gelu(self.fc1(self.norm2(tokens))))


class Hypernetwork(nn.Module):
    def __init__(self, dim: int, num_experts: int, cfg: HypernetConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.block = HyperBlock(dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, spectral=cfg.spectral_norm)
        self.tokens = nn.Parameter(torch.randn(cfg.num_tokens, dim) * cfg.token_init_std)
        keys = torch.empty(num_experts, dim)
        nn.init.kaiming_normal_(keys)  # fan_in = D, gain sqrt(2), as the reference
        self.keys = nn.Parameter(keys)
        if cfg.pool not in ("class0", "mean", "tokens"):
            raise ValueError(f"hypernet.pool must be class0, mean or tokens, got {cfg.pool!r}")

    def temperature(self, tasks_seen: int | float) -> float:
        cfg = self.cfg
        return max(cfg.temperature_min, cfg.temperature_start - float(tasks_seen) / cfg.temperature_decay_tasks)

    @torch.no_grad()
    def power_iteration_(self) -> None:
        for module in self.modules():
            if isinstance(module, SpectralLinear):
                module.power_iteration_(1)

    def forward(
        self,
        prototypes: torch.Tensor,
        temperature: float,
        *,
        generator: Optional[torch.Generator] = None,
        stochastic: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (α (M,), logits a (M,)), both fp32, for class prototypes (C, D) computed under θ_pre."""
        with full_precision(self.keys.device):
            return self._select(prototypes.float(), temperature, generator, stochastic)

    def _select(self, prototypes, temperature, generator, stochastic):
        num_classes = prototypes.shape[0]
        tokens = torch.cat([prototypes.to(self.tokens.dtype), self.tokens], 0)
        out = self.block(tokens)
        pool = self.cfg.pool
        if pool == "class0":
            embedding = out[0]
        elif pool == "mean":
            embedding = out[:num_classes].mean(0)
        else:
            embedding = out[num_classes:].mean(0)
        logits = self.keys @ embedding
        if stochastic:  # RelaxedBernoulli(T, logits).rsample()
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            uniform = uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0 - torch.finfo(uniform.dtype).eps)
            selection = torch.sigmoid((logits + uniform.log() - (-uniform).log1p()) / temperature)
        else:
            selection = torch.sigmoid(logits / temperature)
        if self.num_experts > 1:
            alpha = selection / (selection.sum() + 1e-8)
        else:  # the reference leaves a single expert's weight unnormalised
            alpha = selection
        return alpha, logits
