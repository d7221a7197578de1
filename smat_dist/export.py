"""A trained model as one fp32 safetensors file with its config: loadable without DeepSpeed or Ray.

The file holds the full backbone (θ_pre, so evaluation needs no timm download), θδ, gate logits,
hypernetwork, λ and the task counter; its metadata holds the model and train configs as JSON.
safetensors stores raw tensors only, so loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smat_dist.config import from_dict, to_dict
from smat_dist.fsutil import publish, tmp_path_for
from smat_dist.smat import SMAT
from smat_dist.smat.backbone import build_backbone
from smat_dist.smat.config import ModelConfig
from smat_dist.train.config import TrainConfig

FORMAT = "smat-dist-model-v1"
BACKBONE_PREFIX = "backbone."


def export_model(model, path: str | Path, train_cfg: Optional[TrainConfig] = None, extra: Optional[Dict[str, str]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors["tasks_seen"] = model.tasks_seen.detach().cpu().clone()
    for k, v in model.backbone.state_dict().items():
        tensors[BACKBONE_PREFIX + k] = v.detach().float().contiguous().cpu().clone()
    meta = {
        "format": FORMAT,
        "model_config": json.dumps(to_dict(model.cfg)),
        "train_config": json.dumps(to_dict(train_cfg)) if train_cfg is not None else "{}",
        **(extra or {}),
    }
    tmp = tmp_path_for(path)
    save_file(tensors, str(tmp), metadata=meta)
    return publish(tmp, path)  # fsync + rename: a crash leaves the old file or the whole new one


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a smat-dist model export (format={meta.get('format')!r})")
    return load_file(str(path)), meta


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the :class:`~smat_dist.smat.SMAT` module of an export, in eval mode."""
    tensors, meta = read_export(path)
    cfg: ModelConfig = from_dict(ModelConfig, json.loads(meta["model_config"]))
    bcfg = cfg.backbone
    bcfg.pretrained, bcfg.checkpoint = False, None  # the weights are in the file
    backbone = build_backbone(bcfg)
    bb_state = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    backbone.load_state_dict(bb_state, strict=True)
    model = SMAT(cfg, backbone=backbone)
    state = {k: v for k, v in tensors.items() if not k.startswith(BACKBONE_PREFIX)}
    state["tasks_seen"] = state["tasks_seen"].to(torch.int64)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def train_config_of(path: str | Path) -> TrainConfig:
    _, meta = read_export(path)
    return from_dict(TrainConfig, json.loads(meta.get("train_config") or "{}"))
