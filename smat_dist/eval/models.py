"""What is evaluated: a meta-trained export (SMAT, PMF, SoftMerge, ablations) or the Pre baseline.

A :class:`ModelSpec` is a small picklable recipe; every worker (Ray actor or this process) builds
its own :class:`TaskModel` from it, so no weights travel through the object store. A TaskModel
exposes what meta-testing needs from any method: the frozen backbone (θ_pre in place) and, per
task, the names -> tensors of its merged weights θ_i (``None`` = θ_pre itself).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from smat_dist.config import from_dict, to_dict
from smat_dist.errors import ConfigError
from smat_dist.export import BACKBONE_PREFIX, FORMAT, load_model
from smat_dist.smat.backbone import build_backbone
from smat_dist.smat.config import BackboneConfig, ModelConfig

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"
LABELS = {"smat": "SMAT", "pmf": "PMF", "softmerge": "SoftMerge", "pre": "Pre"}
MODE_SUFFIX = {"none": "", "full": "+full", "lora": "+LoRA"}


def method_label(method: str) -> str:
    return LABELS.get(method.lower(), method)


def column_label(base: str, mode: str) -> str:
    return base + MODE_SUFFIX[mode]


def export_uri(path: str | Path) -> Optional[str]:
    """The object-storage URI of the export a ``--checkpoint`` names (a run or the file), else None."""
    from smat_dist import objstore

    s = str(path)
    if not objstore.is_uri(s):
        return None
    return s if s.endswith(".safetensors") else objstore.join(s, EXPORT_NAME)


def resolve_export(path: str | Path) -> Path:
    """A run directory (holding ``model.safetensors``) or the file itself, local or in object storage
    (``s3://bucket/runs/NAME``: the export is downloaded, see :func:`smat_dist.runstore.fetch_run_file`)."""
    uri = export_uri(path)
    if uri is not None:
        from smat_dist.runstore import fetch_run_file

        try:
            return fetch_run_file(uri, "")
        except FileNotFoundError:
            raise FileNotFoundError(f"--checkpoint {path}: no {uri} (training not finished?)") from None
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / EXPORT_NAME
        if not f.is_file():
            extra = " (training not finished? only checkpoints are there)" if any(p.glob("checkpoint_*")) else ""
            raise FileNotFoundError(f"--checkpoint {p}: no {EXPORT_NAME} in this run directory{extra}")
        return f
    if not p.is_file():
        raise FileNotFoundError(f"--checkpoint {p}: no such file or run directory")
    return p


def _export_meta(path: Path) -> Dict[str, str]:
    """The metadata of an export (no tensors read); a clear error for anything else."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise ValueError(f"{path}: not a smat-dist model export (format={meta.get('format')!r}); "
                         f"expected the model.safetensors that smat-train or export_model writes")
    return meta


def run_config_of(path: Path) -> Optional[dict]:
    """The run config stored with an export (metadata, else ``run_config.yaml`` next to it)."""
    meta = _export_meta(path)
    if meta.get("run_config"):
        return json.loads(meta["run_config"])
    yaml_path = path.parent / "run_config.yaml"
    if yaml_path.is_file():
        return OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)  # type: ignore[return-value]
    return None


@dataclass
class ModelSpec:
    """How to build the evaluated model in any process."""

    kind: str  # "export" (a meta-trained model) | "pre" (the pre-trained ProtoNet)
    path: Optional[str] = None  # the export (for "pre": optional source of θ_pre)
    backbone: Optional[dict] = None  # "pre" without a path: a BackboneConfig as a dict
    cosine_scale: float = 10.0
    method: str = "pre"  # the export's model.method, or "pre"
    img_size: int = 128
    # The run's data.train_sources (also for Pre of a run): what evaluation calls ID. Empty = every
    # source with a train split, which is what an empty data.train_sources trains on.
    train_sources: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return method_label(self.method)


def describe_checkpoint(path: str | Path) -> ModelSpec:
    """The ModelSpec of a meta-trained export, with the facts needed to plan its evaluation."""
    f = resolve_export(path)
    meta = _export_meta(f)
    mcfg = json.loads(meta["model_config"])
    run = run_config_of(f) or {}
    sources = list(((run.get("data") or {}).get("train_sources")) or [])
    # a URI stays one: evaluation workers (possibly on other nodes) fetch it themselves
    return ModelSpec(kind="export", path=export_uri(path) or str(f.resolve()), method=str(mcfg.get("method", "smat")),
                     cosine_scale=float(mcfg.get("cosine_scale", 10.0)),
                     img_size=int(mcfg.get("backbone", {}).get("img_size", 128)), train_sources=sources)


def describe_pre(checkpoint: Optional[str], backbone_cfg) -> ModelSpec:
    """The Pre baseline: θ_pre of an export, or a backbone file / timm model (``model.backbone.*``)."""
    if checkpoint:
        # Keep the run's training sources: Pre's table groups sources ID/OOD exactly as the run's.
        spec = describe_checkpoint(checkpoint)
        return ModelSpec(kind="pre", path=spec.path, method="pre", cosine_scale=spec.cosine_scale,
                         img_size=spec.img_size, train_sources=spec.train_sources)
    bcfg = _backbone_with_file_config(backbone_cfg)
    if not bcfg.checkpoint and not bcfg.pretrained:
        raise ConfigError(
            "--method pre needs pre-trained weights: --checkpoint RUN (its θ_pre), "
            "model.backbone.checkpoint=FILE (a backbone file, e.g. written by smat_dist.smat.backbone.save_backbone), "
            "or model.backbone.name=<timm tag> model.backbone.pretrained=true")
    return ModelSpec(kind="pre", backbone=to_dict(bcfg), method="pre", img_size=int(bcfg.img_size))


def _backbone_with_file_config(bcfg):
    """A smat-dist backbone file may carry its architecture as JSON metadata ``backbone_config``;
    it fills the fields the command line left at their defaults."""
    path = bcfg.checkpoint
    if not path:
        return bcfg
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.backbone.checkpoint: no such file: {p}")
    if p.suffix != ".safetensors":
        return bcfg
    with safe_open(str(p), "pt") as f:
        meta = dict(f.metadata() or {})
    stored = meta.get("backbone_config")
    if not stored:
        return bcfg
    base = json.loads(stored)
    defaults = asdict(BackboneConfig())
    merged = dict(base)
    for k, v in asdict(bcfg).items():
        if v != defaults.get(k) or k not in merged:
            merged[k] = v
    merged["checkpoint"] = str(p)
    merged["pretrained"] = False
    known = {f.name for f in fields(BackboneConfig)}
    return BackboneConfig(**{k: v for k, v in merged.items() if k in known})


class TaskModel:
    """Backbone + per-task merged weights, for any method (see module docstring).

    The merge itself is the model's (:meth:`SMAT.task_alpha`, :meth:`SMAT.merged_weights`); this
    class only keeps what stays fixed across tasks: the deterministic test gates (an (M, G) pass,
    done once, not per task) and the weights of a model whose θ_i does not depend on the task.
    """

    def __init__(self, backbone: nn.Module, cosine_scale: float, smat=None):
        self.backbone = backbone
        self.scale = float(cosine_scale)
        self.smat = smat  # the SMAT module of an export, None for Pre
        self._test_gates = None  # SMAT.test_gates() on the current device
        self._static_weights = None  # (weights,) of a model whose θ_i is the same for every task

    @property
    def has_hypernet(self) -> bool:
        return self.smat is not None and self.smat.hypernet is not None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device) -> "TaskModel":
        if self.smat is not None:
            self.smat.to(device)  # moves the backbone too (its tensors are views of θ_pre)
        else:
            self.backbone.to(device)
        self._test_gates = None
        self._static_weights = None
        return self

    @property
    def static(self) -> bool:
        """θ_i is the same for every task (Pre: θ_pre; no hypernetwork: one merge)."""
        return not self.has_hypernet

    def task_alpha(self, proto_pre: torch.Tensor) -> torch.Tensor:
        """α_i from the task's class prototypes under θ_pre (the model's deterministic test-time α)."""
        return self.smat.task_alpha(proto_pre=proto_pre)

    def weights_for(self, alpha: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """Gated tensor name -> θ_i for expert weights ``alpha`` (views of one flat vector);
        ``alpha=None``: the model's own α of a static model (uniform). None for Pre (θ_pre)."""
        m = self.smat
        if m is None:
            return None
        if alpha is None:
            alpha = m.task_alpha()
        if self._test_gates is None:
            self._test_gates = m.test_gates()
        return m.space.views(m.merged_weights(alpha, gates=self._test_gates))

    def static_weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """θ of a static model (None = θ_pre), merged once."""
        if self._static_weights is None:
            self._static_weights = (self.weights_for(None),)
        return self._static_weights[0]

    def dense_weights(self, weights: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Every backbone parameter of the task's dense θ_i (θ_pre where nothing is merged)."""
        out = {n: p for n, p in self.backbone.named_parameters()}
        if weights:
            out.update(weights)
        return out


def build_task_model(spec: ModelSpec, device: str | torch.device = "cpu") -> TaskModel:
    if spec.kind == "export":
        smat = load_model(resolve_export(spec.path), device="cpu")
        model = TaskModel(smat.backbone, spec.cosine_scale, smat)
    elif spec.kind == "pre" and spec.path:
        backbone = _backbone_of_export(resolve_export(spec.path))
        model = TaskModel(backbone, spec.cosine_scale)
    elif spec.kind == "pre":
        bcfg = from_dict(BackboneConfig, spec.backbone or {})
        try:
            backbone = build_backbone(bcfg)
        except RuntimeError as exc:  # weights of another architecture: say which keys describe it
            lines = str(exc).splitlines()
            brief = " ".join(l.strip() for l in lines[:3]) + (f" ... ({len(lines) - 3} more)" if len(lines) > 3 else "")
            raise ConfigError(f"{brief}; set model.backbone.name/img_size/patch_size/embed_dim/depth/num_heads "
                              f"to the architecture of {bcfg.checkpoint or bcfg.name}") from None
        model = TaskModel(backbone, spec.cosine_scale)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    model.backbone.eval()
    return model.to(device)


def _backbone_of_export(path: Path) -> nn.Module:
    """θ_pre of an export without building its gates (M·|θ| logits) or hypernetwork."""
    meta = _export_meta(path)
    cfg = from_dict(ModelConfig, json.loads(meta["model_config"]))
    bcfg = cfg.backbone
    bcfg.pretrained, bcfg.checkpoint = False, None
    backbone = build_backbone(bcfg)
    with safe_open(str(path), "pt") as f:
        state = {k[len(BACKBONE_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(BACKBONE_PREFIX)}
    backbone.load_state_dict(state, strict=True)
    backbone.requires_grad_(False)
    return backbone


__all__ = ["LABELS", "MODE_SUFFIX", "ModelSpec", "TaskModel", "build_task_model", "column_label",
           "describe_checkpoint", "describe_pre", "method_label", "resolve_export", "run_config_of"]
