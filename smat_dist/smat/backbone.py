"""The frozen backbone θ_pre and the flat parameter space SMAT works in.

SMAT's parameter-space work (merging M experts, gate gradients, the L0 term) is memory-bandwidth
bound: ``M·|θ|`` values per pass (173M for ViT-S with M=8). Holding the gated tensors as one flat
vector turns each of those passes into a single large kernel instead of ~150 small ones, and lets a
task's weights be one tensor whose gradient ``G_t = ∂L_t/∂θ_t`` is one vector.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from smat_dist.smat.config import BackboneConfig

log = logging.getLogger(__name__)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A timm ViT returning the final-norm CLS token (no head), all parameters frozen."""
    import timm
    import timm.layers

    timm.layers.set_fused_attn(cfg.fused_attn)
    kwargs = dict(num_classes=0, global_pool="token", img_size=cfg.img_size)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    checkpoint = cfg.checkpoint
    if checkpoint and Path(checkpoint).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"backbone.checkpoint: no such file: {checkpoint}")
    try:
        if checkpoint and _is_smat_backbone_file(checkpoint):
            model = timm.create_model(cfg.name, pretrained=False, **kwargs)
            _load_smat_backbone(model, checkpoint)
        elif checkpoint:
            # timm's own loader applies the model's checkpoint filter (DINO .pth, position
            # embedding resampling to img_size).
            model = timm.create_model(
                cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **kwargs
            )
        else:
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot build backbone '{cfg.name}' from {checkpoint or 'timm'}: {exc}") from exc
    model.requires_grad_(False)
    model.eval()  # ViT-S/B DINO have no dropout; eval() also keeps any drop-path off
    return model


def _is_smat_backbone_file(path: str) -> bool:
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta.get("format") == "smat-dist-backbone"


def _load_smat_backbone(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: backbone mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")


def save_backbone(model: nn.Module, path: str | Path, extra: Optional[Dict[str, str]] = None) -> None:
    """Write backbone weights in the format :func:`build_backbone` loads via ``checkpoint``."""
    from safetensors.torch import save_file

    meta = {"format": "smat-dist-backbone", **(extra or {})}
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: torch.Size
    offset: int
    numel: int


class ParamSpace:
    """The gated backbone tensors laid out as one flat vector.

    After construction the backbone's own gated parameters are views into ``flat`` (θ_pre), so
    θ_pre exists once in memory and a plain ``backbone(x)`` is the pre-trained network.
    """

    def __init__(self, backbone: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()):
        slots: List[ParamSlot] = []
        offset = 0
        for name, p in backbone.named_parameters():
            if not any(fnmatch.fnmatchcase(name, pat) for pat in include):
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            slots.append(ParamSlot(name, p.shape, offset, p.numel()))
            offset += p.numel()
        if not slots:
            raise ValueError(f"delta_include={list(include)} / delta_exclude={list(exclude)} select no parameter")
        self.slots = slots
        self.numel = offset
        params = dict(backbone.named_parameters())
        first = params[slots[0].name]
        flat = torch.empty(offset, dtype=first.dtype, device=first.device)
        for slot in slots:
            flat[slot.offset : slot.offset + slot.numel].copy_(params[slot.name].detach().reshape(-1))
            params[slot.name].data = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        self.flat = flat
        self._sizes = [slot.numel for slot in slots]

    def views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Name -> tensor views of a flat vector laid out like θ_pre (autograd-transparent)."""
        return {slot.name: part.view(slot.shape) for slot, part in zip(self.slots, torch.split(flat, self._sizes))}

    def fingerprint(self) -> str:
        """A short hash of θ_pre, stored in checkpoints to refuse resuming onto other weights."""
        digest = hashlib.sha256()
        digest.update(str([(slot.name, tuple(slot.shape)) for slot in self.slots]).encode())
        sample = self.flat[:: max(1, self.numel // 65536)].detach().float().cpu().contiguous()
        digest.update(sample.numpy().tobytes())
        return digest.hexdigest()[:16]


def features(backbone: nn.Module, params: Optional[Dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """CLS features of ``x`` under ``params`` (the gated tensors; the rest are θ_pre)."""
    if params is None:
        return backbone(x)
    return functional_call(backbone, params, (x,), strict=False)


def backbone_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim"))
