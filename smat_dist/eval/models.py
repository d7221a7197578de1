"""What is evaluated: a meta-trained export (SMAT, PMF, SoftMerge, ablations) or the Pre baseline.

A :class:`ModelSpec` is a small picklable recipe; every worker (Ray actor or this process) builds
its own :class:`TaskModel` from it, so no weights travel through the object store. A TaskModel
exposes what meta-testing needs from any method: the frozen backbone (θ_pre in place) and, per
task, the names -> tensors of its merged weights θ_i (``None`` = θ_pre itself).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from smat_dist.errors import ConfigError

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"
LABELS = {"smat": "SMAT", "pmf": "PMF", "softmerge": "SoftMerge", "pre": "Pre"}
MODE_SUFFIX = {"none": "", "full": "+full", "lora": "+LoRA"}


def method_label(method: str) -> str:
    return LABELS.get(method.lower(), method)


def column_label(base: str, mode: str) -> str:
    return base + MODE_SUFFIX[mode]


def resolve_export(path: str | Path) -> Path:
    """A run directory (holding ``model.safetensors``) or the file itself."""
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
    from safetensors import safe_open

    from smat_dist.export import FORMAT

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
        from omegaconf import OmegaConf

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
    train_sources: List[str] = field(default_factory=list)  # the run's data.train_sources

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
    return ModelSpec(kind="export", path=str(f.resolve()), method=str(mcfg.get("method", "smat")),
                     cosine_scale=float(mcfg.get("cosine_scale", 10.0)),
                     img_size=int(mcfg.get("backbone", {}).get("img_size", 128)), train_sources=sources)


def describe_pre(checkpoint: Optional[str], backbone_cfg) -> ModelSpec:
    """The Pre baseline: θ_pre of an export, or a backbone file / timm model (``model.backbone.*``)."""
    from smat_dist.config import to_dict

    if checkpoint:
        spec = describe_checkpoint(checkpoint)
        return ModelSpec(kind="pre", path=spec.path, method="pre", cosine_scale=spec.cosine_scale,
                         img_size=spec.img_size, train_sources=[])
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
    import dataclasses

    from smat_dist.smat.config import BackboneConfig

    path = bcfg.checkpoint
    if not path:
        return bcfg
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.backbone.checkpoint: no such file: {p}")
    if p.suffix != ".safetensors":
        return bcfg
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = dict(f.metadata() or {})
    stored = meta.get("backbone_config")
    if not stored:
        return bcfg
    base = json.loads(stored)
    defaults = dataclasses.asdict(BackboneConfig())
    merged = dict(base)
    for k, v in dataclasses.asdict(bcfg).items():
        if v != defaults.get(k) or k not in merged:
            merged[k] = v
    merged["checkpoint"] = str(p)
    merged["pretrained"] = False
    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    return BackboneConfig(**{k: v for k, v in merged.items() if k in known})


class TaskModel:
    """Backbone + per-task merged weights, for any method (see module docstring)."""

    def __init__(self, backbone: nn.Module, cosine_scale: float, smat=None):
        self.backbone = backbone
        self.scale = float(cosine_scale)
        self.smat = smat  # the SMAT module of an export, None for Pre
        self._z = None  # deterministic test gates, computed once (not per task)
        self._static = None  # (params,) of a model whose θ_i is the same for every task

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
        self._z = None
        self._static = None
        return self

    @property
    def static(self) -> bool:
        """θ_i is the same for every task (Pre: θ_pre; no hypernetwork: one merge)."""
        return not self.has_hypernet

    @torch.no_grad()
    def alpha_from_prototypes(self, proto_pre: torch.Tensor) -> torch.Tensor:
        """α_i from the task's θ_pre class prototypes: deterministic, test temperature (§8.1)."""
        m = self.smat
        return m.hypernet(proto_pre.float(), m.temperature(), stochastic=False)[0].detach().float()

    @torch.no_grad()
    def merged(self, alpha: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """Gated tensor name -> θ_i = θ_pre + (Σ_m α_m z_m) ⊙ θδ (views of one flat vector).

        The same θ_i as :meth:`SMAT.task_weights` (deterministic gates, no inner step: D6), but
        the (M, G) test gates are computed once instead of per task.
        """
        m = self.smat
        if m is None:
            return None
        from smat_dist.smat.gates import GateSample
        from smat_dist.smat.merge import MergePlan, merge

        if alpha is None:  # no hypernetwork: uniform weights, as SMAT._alpha
            alpha = torch.full((m.num_experts,), 1.0 / m.num_experts, device=m.device)
        sample = None
        if m.gates is not None:
            if self._z is None:
                self._z = m.gates.deterministic()
            sample = GateSample(z=self._z, stochastic=False)
        theta = merge(m.theta_pre, m.delta, None, alpha.to(m.delta.dtype), MergePlan(m.layout, sample), flush=True)
        return m.space.views(theta)

    def static_params(self) -> Optional[Dict[str, torch.Tensor]]:
        """θ of a static model (None = θ_pre), merged once."""
        if self._static is None:
            self._static = (self.merged(None),)
        return self._static[0]

    @torch.no_grad()
    def task_params(self, support_x: torch.Tensor, support_y: torch.Tensor
                    ) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[torch.Tensor]]:
        """(θ_i as gated tensor name -> tensor, α_i) of a task from its pixels; (None, None) for Pre."""
        if self.smat is None:
            return None, None
        if self.static:
            return self.static_params(), None
        from smat_dist.smat.backbone import features
        from smat_dist.smat.protonet import prototypes

        ways = int(support_y.max()) + 1
        proto = prototypes(features(self.backbone, None, support_x).float(), support_y, ways)
        alpha = self.alpha_from_prototypes(proto)
        return self.merged(alpha), alpha

    def full_params(self, params: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Every backbone parameter of the task's dense θ_i (θ_pre where nothing is merged)."""
        out = {n: p for n, p in self.backbone.named_parameters()}
        if params:
            out.update(params)
        return out


def build_task_model(spec: ModelSpec, device: str | torch.device = "cpu") -> TaskModel:
    from smat_dist.smat.backbone import build_backbone

    if spec.kind == "export":
        from smat_dist.export import load_model

        smat = load_model(spec.path, device="cpu")
        model = TaskModel(smat.backbone, spec.cosine_scale, smat)
    elif spec.kind == "pre" and spec.path:
        backbone = _backbone_of_export(Path(spec.path))
        model = TaskModel(backbone, spec.cosine_scale)
    elif spec.kind == "pre":
        from smat_dist.config import from_dict
        from smat_dist.smat.config import BackboneConfig

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
    from safetensors import safe_open

    from smat_dist.config import from_dict
    from smat_dist.export import BACKBONE_PREFIX
    from smat_dist.smat.backbone import build_backbone
    from smat_dist.smat.config import ModelConfig

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
