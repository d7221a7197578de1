"""Everything a run needs, checked in the launching process before Ray starts or ranks spawn.

A problem is one :data:`USER_ERRORS` exception whose message names the file (or key) and what is wrong;
the command lines print it as one line and exit 2. The checks read headers and manifests only, so they
take well under a second; what can only be known on a rank (θ_pre's fingerprint against a resumed
checkpoint) is checked there and reported the same way (:mod:`smat_dist.train.runlog`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from smat_dist.config import RunConfig
from smat_dist.data import check_root
from smat_dist.data.store import DataError
from smat_dist.errors import ConfigError
from smat_dist.fsutil import check_writable_dir
from smat_dist.train import checkpoint as ckpt
from smat_dist.train.runlock import RunLocked
from smat_dist.weightsfile import WeightsError, check_weights_file


def _user_errors() -> tuple:
    return (ConfigError, ckpt.CheckpointError, WeightsError, DataError, FileNotFoundError, PermissionError,
            NotADirectoryError, RunLocked)


def check_backbone(cfg: RunConfig) -> None:
    b = cfg.model.backbone
    if b.checkpoint:
        check_weights_file(b.checkpoint, "model.backbone.checkpoint")


def check_resume(cfg: RunConfig, run_dir: Path, *, engine: str, world_size: int) -> Optional[Path]:
    """Where the run will resume from (checked), or None for a fresh start."""
    latest, broken = ckpt.scan(run_dir)
    if latest is None and broken:
        newest, why = broken[-1]
        raise ckpt.CheckpointError(f"{why}; the run {run_dir} has no complete checkpoint to resume from: "
                                   f"remove {newest} or choose another train.run_name")
    point = latest
    if point is None and cfg.dist.resume_from:
        point = Path(cfg.dist.resume_from).expanduser().resolve()
    if point is None:
        return None
    meta = ckpt.inspect(point)
    ckpt.check_resumable(meta, point, tasks_per_step=cfg.train.tasks_per_step, world_size=world_size, engine=engine,
                         theta_pre=None)
    check_same_model(cfg, point)
    return point


# Model keys that decide which parameters exist and their shapes: a checkpoint written under other
# values cannot be loaded (the ranks would find out only after Ray and DeepSpeed started).
SHAPE_KEYS = ("method", "backbone.name", "backbone.img_size", "backbone.patch_size", "backbone.embed_dim",
              "backbone.depth", "backbone.num_heads", "gates.enabled", "gates.num_experts", "gates.structured",
              "hypernet.enabled", "hypernet.num_tokens", "hypernet.num_heads", "hypernet.mlp_ratio")


def check_same_model(cfg: RunConfig, point: Path) -> None:
    """Refuse to resume ``point`` under a model of other shapes, judged by the ``run_config.yaml``
    its run wrote (checked before anything is written, so a refused resume leaves the run as it was)."""
    from omegaconf import OmegaConf

    from smat_dist.config import to_dict

    saved = point.parent / "run_config.yaml"
    if not saved.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved)).get("model", {})
    except Exception:  # noqa: BLE001 - an unreadable record is no reason to refuse; the ranks still check
        return
    new = to_dict(cfg.model)
    for key in SHAPE_KEYS:
        a, b = old, new
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a is not None and a != b:
            raise ckpt.CheckpointError(
                f"{point}: written with model.{key}={a}, this run has model.{key}={b}: the checkpoint's parameters "
                f"would not fit; keep model.{key}={a} to resume, or choose another train.run_name")


def check_data(cfg: RunConfig) -> None:
    if cfg.data.episodes != "shards":
        return

    check_root(cfg.data, split="train", sources=cfg.data.train_sources or None)


def check_output(run_dir: Path) -> None:
    check_writable_dir(run_dir, "the run directory: train.output_dir / dist.storage_path")


def preflight(cfg: RunConfig, run_dir: Path, *, engine: str, world_size: int) -> Optional[Path]:
    """Run every check; returns the resume point. Raises one of :func:`user_errors`."""
    check_output(run_dir)
    check_backbone(cfg)
    point = check_resume(cfg, run_dir, engine=engine, world_size=world_size)
    check_data(cfg)
    return point


USER_ERRORS = _user_errors()

__all__ = ["preflight", "check_weights_file", "check_backbone", "check_resume", "check_data", "WeightsError",
           "USER_ERRORS"]
