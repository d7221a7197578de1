"""Everything a run needs, checked in the launching process before Ray starts or ranks spawn.

A problem is one :data:`USER_ERRORS` exception whose message names the file (or key) and what is wrong;
the command lines print it as one line and exit 2. The checks read headers and manifests only, so they
take well under a second; what can only be known on a rank (θ_pre's fingerprint against a resumed
checkpoint) is checked there and reported the same way (:mod:`smat_dist.train.runlog`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from smat_dist import objstore, runstore
from smat_dist.config import RunConfig
from smat_dist.data import check_root
from smat_dist.data.store import DataError
from smat_dist.errors import ConfigError
from smat_dist.runstore import RunStore
from smat_dist.train import checkpoint as ckpt
from smat_dist.train.runlock import RunLocked
from smat_dist.weightsfile import WeightsError, check_weights_file


def _user_errors() -> tuple:
    return (ConfigError, ckpt.CheckpointError, WeightsError, DataError, FileNotFoundError, PermissionError,
            NotADirectoryError, RunLocked, objstore.StorageError)


def check_backbone(cfg: RunConfig) -> None:
    b = cfg.model.backbone
    if b.checkpoint:
        check_weights_file(b.checkpoint, "model.backbone.checkpoint")


def check_resume(cfg: RunConfig, store: RunStore, *, engine: str, world_size: int) -> Optional[str]:
    """Where the run will resume from (checked; a path or URI), or None for a fresh start."""
    latest, broken = store.scan()
    if latest is None and broken:
        newest, why = broken[-1]
        raise ckpt.CheckpointError(f"{why}; the run {store.uri} has no complete checkpoint to resume from: "
                                   f"remove {newest} or choose another train.run_name")
    point = latest
    if point is None and cfg.dist.resume_from:
        point = cfg.dist.resume_from if objstore.is_uri(cfg.dist.resume_from) else \
            str(Path(cfg.dist.resume_from).expanduser().resolve())
    if point is None:
        return None
    meta = runstore.inspect(point)
    ckpt.check_resumable(meta, point, tasks_per_step=cfg.train.tasks_per_step, world_size=world_size, engine=engine,
                         theta_pre=None)
    check_same_model(cfg, point)
    return point


# Model keys that decide which parameters exist and their shapes: a checkpoint written under other
# values cannot be loaded (the ranks would find out only after Ray and DeepSpeed started).
SHAPE_KEYS = ("method", "backbone.name", "backbone.img_size", "backbone.patch_size", "backbone.embed_dim",
              "backbone.depth", "backbone.num_heads", "gates.enabled", "gates.num_experts", "gates.structured",
              "hypernet.enabled", "hypernet.num_tokens", "hypernet.num_heads", "hypernet.mlp_ratio")


def check_same_model(cfg: RunConfig, point: str | Path) -> None:
    """Refuse to resume ``point`` (a path or URI) under a model of other shapes, judged by the
    ``run_config.yaml`` its run wrote (checked before anything is written, so a refused resume leaves the
    run as it was)."""
    from omegaconf import OmegaConf

    from smat_dist.config import to_dict

    if objstore.is_uri(str(point)):
        try:
            saved = runstore.fetch_run_file(str(point).rstrip("/").rsplit("/", 1)[0], "run_config.yaml")
        except (FileNotFoundError, objstore.StorageError):
            return
    else:
        saved = Path(point).parent / "run_config.yaml"
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


def check_cluster_paths(cfg: RunConfig) -> None:
    """Joining a running cluster (``RAY_ADDRESS``, as under ``ray job submit``), the driver's working
    directory is a job's temporary copy and the workers' is another: a relative run location would
    scatter the run over them, so it is refused."""
    if not os.environ.get("RAY_ADDRESS"):
        return
    for key, value in (("dist.storage_path", cfg.dist.storage_path),
                       ("train.output_dir", None if cfg.dist.storage_path else cfg.train.output_dir),
                       ("dist.resume_from", cfg.dist.resume_from)):
        if value and not objstore.is_uri(value) and not os.path.isabs(os.path.expanduser(value)):
            raise ConfigError(f"{key}={value!r} is relative, but this run joins the cluster at RAY_ADDRESS, whose "
                              f"processes run in other directories: give an absolute path every node sees, or "
                              f"object storage (dist.storage_path=s3://bucket/runs)")


def check_output(store: RunStore) -> None:
    """The run directory (or bucket) can be written, with this process's credentials."""
    store.check_writable()


def preflight(cfg: RunConfig, store: RunStore, *, engine: str, world_size: int,
              cluster: bool = False) -> Optional[str]:
    """Run every check; returns the resume point. Raises one of :func:`user_errors`. ``cluster``: the
    launcher may join ``$RAY_ADDRESS`` (run locations must then be absolute or object storage)."""
    if cluster:
        check_cluster_paths(cfg)
    check_output(store)
    check_backbone(cfg)
    point = check_resume(cfg, store, engine=engine, world_size=world_size)
    check_data(cfg)
    return point


USER_ERRORS = _user_errors()

__all__ = ["preflight", "check_weights_file", "check_backbone", "check_resume", "check_data", "check_output",
           "check_cluster_paths", "WeightsError", "USER_ERRORS"]
