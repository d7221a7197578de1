"""Run configuration: dataclass defaults ⊕ run YAML ⊕ command-line dotlist.

The dataclasses are the only place defaults live. A YAML file may start from others with
``_base_: other.yaml`` or ``_base_: [a.yaml, b.yaml]`` (paths relative to the file, merged in order). Unknown keys and wrong types are one
:class:`ConfigError` that names the key and, where it came from a file, the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from smat_dist.data.config import DataConfig
from smat_dist.train.config import DebugConfig, DistConfig, TrainConfig, uneven_zero_error
from smat_dist.errors import ConfigError
from smat_dist.monitoring.config import MonitorConfig
from smat_dist.smat.config import ModelConfig

T = TypeVar("T")


@dataclass
class RunConfig:
    """Everything one run needs; the YAML files under configs/ are partial RunConfigs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # Prometheus metrics (smat_dist/monitoring)
    debug: DebugConfig = field(default_factory=DebugConfig)  # test hooks only

    def run_store(self):
        """The run directory ``<dist.storage_path or train.output_dir>/<train.run_name>`` (metrics,
        checkpoints, export, log): a local path or an object-storage URI (:class:`smat_dist.runstore.RunStore`)."""
        from smat_dist.runstore import RunStore

        return RunStore(self.dist.storage_path or self.train.output_dir, self.train.run_name, self.dist.staging_dir)

    def run_dir(self) -> Path:
        """Where this node's processes write the run directory: the directory itself, or for object
        storage its node-local staging copy (:meth:`run_store`)."""
        return self.run_store().local

    def validate(self) -> None:
        """Every section's own checks, then the ones across sections; called by :func:`load_config`."""
        self.model.validate()
        self.train.validate()
        self.run_store()  # an unsupported storage URL is a ConfigError naming the key
        self.data.validate()
        self.dist.validate()
        self.monitor.validate()
        self.debug.validate()
        if self.train.tasks_per_step < self.dist.num_workers:  # any other split works (docs/training.md)
            raise ConfigError(
                f"train.tasks_per_step ({self.train.tasks_per_step}) is smaller than dist.num_workers "
                f"({self.dist.num_workers}): some ranks would have no task"
            )
        if self.train.tasks_per_step % self.dist.num_workers and self.dist.zero_stage > 0:
            raise ConfigError(uneven_zero_error(self.train.tasks_per_step, self.dist.num_workers, self.dist.zero_stage))
        if self.data.episodes == "shards" and self.data.image_size != self.model.backbone.img_size:
            raise ConfigError(
                f"data.image_size ({self.data.image_size}) differs from model.backbone.img_size "
                f"({self.model.backbone.img_size}); set both to the meta-training resolution"
            )


def _merge_yaml(base: DictConfig, path: Path, seen: Optional[List[Path]] = None) -> DictConfig:
    seen = list(seen or [])
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    base_ref = loaded.pop("_base_", None)
    if base_ref is not None:  # one file or a list, merged in order
        refs = list(base_ref) if OmegaConf.is_list(base_ref) or isinstance(base_ref, (list, tuple)) else [base_ref]
        for ref in refs:
            base = _merge_yaml(base, (path.parent / str(ref)), seen + [path])
    try:
        return OmegaConf.merge(base, loaded)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).split("\n")[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(
    schema: Type[T],
    yaml_paths: Iterable[str | Path] = (),
    overrides: Sequence[str] = (),
    open_keys: Sequence[str] = (),
) -> T:
    """Build a typed, read-only config object of ``schema``.

    ``open_keys`` name mappings that accept keys the schema does not list (a sweep's ``axes`` are
    run-config keys, checked per cell); everything else is closed.
    """
    cfg: DictConfig = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for key in open_keys:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    for p in yaml_paths:
        cfg = _merge_yaml(cfg, Path(p))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: {_describe(exc)}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def from_dict(schema: Type[T], data: dict) -> T:
    """Rebuild a config saved with :func:`to_dict` (checkpoints carry their config)."""
    cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


__all__ = [
    "ConfigError",
    "ModelConfig",
    "RunConfig",
    "load_config",
    "to_yaml",
    "to_dict",
    "from_dict",
]
