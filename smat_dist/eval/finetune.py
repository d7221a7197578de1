"""Test-time fine-tuning of a task's merged weights θ_i on its support set.

Both modes start from θ_i and run K steps of AdamW. Each step (the published SMAT code's loop):

1. prototypes of the *un-augmented* support under the current weights, with gradient;
2. CE of ``scale·cos(f(aug(x_s)), prototypes)`` on the support labels; one optimiser step.

The reported prediction is the query's after the K-th step (prototypes recomputed). Unlike the
published code as released, K really is ``finetune.steps`` (default 50): its loop reads a step count
of 0. Query labels are never read here: only the accuracy, computed by the caller, uses them.

* ``full``: every backbone tensor of the dense θ_i becomes a fresh trainable copy (the experts
  collapsed into one dense network); the forward is ``torch.func.functional_call`` on the frozen backbone.
* ``lora``: a per-worker working copy of the backbone with peft LoRA adapters (timm's fused ``qkv``
  by default; the published code's ``query``/``value`` names only exist in HF ViTs). Per task its base
  weights are overwritten with θ_i and the adapters re-initialised (A Kaiming-uniform as peft does,
  B = 0, so training starts exactly at θ_i); only A and B train.

Nothing here writes to the checkpoint's tensors: θ_i is copied before training, the LoRA workspace
owns its storage. Randomness (augmentation, LoRA init, LoRA dropout) is seeded per episode.
"""

from __future__ import annotations

import contextlib
import copy
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.episode import Episode
from smat_dist.errors import ConfigError
from smat_dist.eval.augment import support_augment
from smat_dist.eval.config import FinetuneConfig
from smat_dist.smat.backbone import features
from smat_dist.smat.protonet import cosine_logits, prototypes

_MODE_CODE = {"none": 0, "full": 1, "lora": 2}


def episode_seed(seed: int, source: str, index: int, mode: str) -> int:
    """A 63-bit seed for the random streams of one (episode, mode): independent of who runs it."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(source.encode()), int(index), _MODE_CODE[mode], 0x5E7A])
    return int(ss.generate_state(2, dtype=np.uint32).view(np.uint64)[0]) >> 1


@dataclass
class FinetuneOutput:
    query_logits: torch.Tensor
    losses: List[float]
    weights: Optional[Dict[str, torch.Tensor]] = None  # the fine-tuned dense weights, when asked


def _run_steps(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, ep: Episode,
               steps: int, scale: float, cfg: FinetuneConfig, gen: torch.Generator, autocast) -> List[float]:
    xs, ys = ep.support_x, ep.support_y
    ways = ep.ways
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast():
            f_s = forward(xs).float()
            protos = prototypes(f_s, ys, ways)  # with gradient, un-augmented support
            if cfg.augment:
                f_a = forward(support_augment(xs, gen, cfg.aug_prob, cfg.translate)).float()
            else:
                f_a = f_s
            loss = F.cross_entropy(cosine_logits(f_a, protos, scale), ys)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _predict(forward, ep: Episode, scale: float, autocast) -> torch.Tensor:
    with autocast():
        protos = prototypes(forward(ep.support_x).float(), ep.support_y, ep.ways)
        return cosine_logits(forward(ep.query_x).float(), protos, scale)


def _adamw(params, lr: float, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def finetune_full(backbone: nn.Module, dense: Dict[str, torch.Tensor], ep: Episode, lr: float, scale: float,
                  cfg: FinetuneConfig, seed: int, autocast=contextlib.nullcontext,
                  keep_weights: bool = False) -> FinetuneOutput:
    """All weights of the task's dense θ_i (``dense``: every backbone parameter) fine-tuned."""
    weights = {n: t.detach().clone().requires_grad_(True) for n, t in dense.items()}
    gen = torch.Generator().manual_seed(seed)

    def forward(x):
        return features(backbone, weights, x)

    opt = _adamw(list(weights.values()), lr, cfg)
    with torch.enable_grad():
        losses = _run_steps(forward, opt, ep, cfg.steps, scale, cfg, gen, autocast)
    logits = _predict(forward, ep, scale, autocast)
    kept = {n: w.detach() for n, w in weights.items()} if keep_weights else None
    return FinetuneOutput(logits, losses, kept)


class LoraWorkspace:
    """A backbone copy with peft LoRA adapters, reused across tasks (reset per task)."""

    def __init__(self, backbone: nn.Module, cfg: FinetuneConfig):
        from peft import LoraConfig, inject_adapter_in_model

        net = copy.deepcopy(backbone)
        for t in list(net.parameters()) + list(net.buffers()):
            t.data = t.data.clone()  # own storage: never a view of the checkpoint's θ_pre
        net.requires_grad_(False)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none")
        try:
            inject_adapter_in_model(lcfg, net)
        except ValueError as exc:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"finetune.lora_targets={list(cfg.lora_targets)} match no layer of the backbone "
                              f"(its Linear layers are named {linear}): {exc}") from None
        self.net = net
        self.cfg = cfg
        self.base: Dict[str, torch.Tensor] = {}
        self.lora_a: List[torch.Tensor] = []
        self.lora_b: List[torch.Tensor] = []
        for name, p in net.named_parameters():
            if ".lora_A." in name:
                self.lora_a.append(p)
            elif ".lora_B." in name:
                self.lora_b.append(p)
            else:
                p.requires_grad_(False)
                self.base[name.replace(".base_layer.", ".")] = p
        for p in self.lora_a + self.lora_b:
            p.requires_grad_(True)
        missing = sorted(set(n for n, _ in backbone.named_parameters()) - set(self.base))
        if missing:
            raise RuntimeError(f"LoRA workspace lost backbone parameters {missing[:5]}")
        self.adapted = sorted({n.split(".lora_A.")[0] for n, _ in net.named_parameters() if ".lora_A." in n})

    def reset(self, dense: Dict[str, torch.Tensor], seed: int) -> None:
        """Base weights := θ_i, A := Kaiming-uniform(a=√5) from ``seed``, B := 0."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.base.items():
                p.copy_(dense[name])
            for a in self.lora_a:
                init = torch.empty(a.shape, dtype=a.dtype)
                nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
                a.copy_(init)
            for b in self.lora_b:
                b.zero_()

    def effective_weights(self) -> Dict[str, torch.Tensor]:
        """The dense weights the adapted net computes with: base + scaling·B·A on adapted layers."""
        out = {n: p.detach().clone() for n, p in self.base.items()}
        for mod_name in self.adapted:
            mod = self.net.get_submodule(mod_name)
            out[f"{mod_name}.weight"] = out[f"{mod_name}.weight"] + mod.get_delta_weight("default").detach()
        return out

    def run(self, dense: Dict[str, torch.Tensor], ep: Episode, lr: float, scale: float, seed: int,
            autocast=contextlib.nullcontext, keep_weights: bool = False) -> FinetuneOutput:
        self.reset(dense, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        opt = _adamw(self.lora_a + self.lora_b, lr, self.cfg)
        dev = ep.support_x.device
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # LoRA dropout draws from the global RNG
            torch.manual_seed(seed + 2)
            self.net.train()
            try:
                with torch.enable_grad():
                    losses = _run_steps(self.net, opt, ep, self.cfg.steps, scale, self.cfg, gen, autocast)
            finally:
                self.net.eval()
        logits = _predict(self.net, ep, scale, autocast)
        return FinetuneOutput(logits, losses, self.effective_weights() if keep_weights else None)


__all__ = ["FinetuneOutput", "LoraWorkspace", "episode_seed", "finetune_full"]
