"""Typed settings of an ablation sweep (``smat-sweep --config configs/sweeps/<name>.yaml``).

A sweep is a base run config plus ``axes``: a mapping from any run-config key (dotted, as on the
``smat-train`` command line) to the list of values it takes; cells are the cartesian product. The
special axis ``config`` varies the run YAML itself (e.g. SMAT vs PMF); its values are a path or a list
of paths. A value may be a list (``data.train_sources: [[a, b], [a, b, c]]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from smat_dist.config import load_config
from smat_dist.errors import ConfigError
from smat_dist.monitoring.config import MonitorConfig

CONFIG_AXIS = "config"


@dataclass
class CellResources:
    """What one cell takes from the cluster; mapped onto the run's ``dist.*`` and smat-eval's ``actor*``."""

    num_workers: int = 1  # Ray Train workers of the cell's training run (dist.num_workers)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu
    eval_actors: int = 0  # smat-eval actors on the cluster; 0 = evaluate inside the cell's eval process
    eval_actor_cpus: Optional[float] = None
    eval_actor_gpus: Optional[float] = None

    def train_overrides(self) -> List[str]:
        out = [f"dist.num_workers={self.num_workers}", f"dist.cpus_per_worker={self.cpus_per_worker}",
               f"dist.use_gpu={str(self.use_gpu).lower()}"]
        if self.use_gpu:
            out.append(f"dist.gpus_per_worker={self.gpus_per_worker}")
        return out

    def eval_overrides(self) -> List[str]:
        out = [f"actors={self.eval_actors}"]
        if self.eval_actor_cpus is not None:
            out.append(f"actor_cpus={self.eval_actor_cpus}")
        if self.eval_actor_gpus is not None:
            out.append(f"actor_gpus={self.eval_actor_gpus}")
        return out

    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0

    def eval_gpus(self) -> float:
        return self.eval_actors * (self.eval_actor_gpus or 0.0)


@dataclass
class EvalSettings:
    data: Optional[str] = None  # dataset root for smat-eval; None = the cell's data.root
    overrides: List[str] = field(default_factory=list)  # smat-eval key=value (episodes=600, modes=[...])
    mode: str = "none"  # the results.csv mode whose ID/OOD averages fill sweep.csv


@dataclass
class PlotSettings:
    # ID-vs-OOD trade-off (the paper's Fig. (a)): colour and marker columns of sweep.csv
    tradeoff_color: str = "tau"
    tradeoff_marker: str = "num_experts"
    # accuracy vs number of meta-training sources, one line per value of scaling_series
    scaling_x: str = "num_train_sources"
    scaling_series: str = "method"


@dataclass
class SweepConfig:
    name: str = "sweep"
    base: List[str] = field(default_factory=list)  # run YAMLs every cell starts from (relative to this file)
    overrides: List[str] = field(default_factory=list)  # run key=value for every cell
    axes: Dict[str, List[Any]] = field(default_factory=dict)
    exclude: List[Dict[str, Any]] = field(default_factory=list)  # partial assignments whose cells are skipped
    out: Optional[str] = None  # sweep directory; None = <train.output_dir of the base>/sweeps/<name>
    concurrency: int = 1  # cells running at once on the cluster
    max_attempts: int = 2  # a failed cell is run again up to this many attempts in all
    cell_timeout_s: Optional[float] = None  # per attempt of a cell (training + evaluation)
    resources: CellResources = field(default_factory=CellResources)
    eval: EvalSettings = field(default_factory=EvalSettings)
    plots: PlotSettings = field(default_factory=PlotSettings)
    # the driver's own progress gauge (smat_sweep_cells) on a prometheus_client endpoint
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        if not self.axes:
            raise ConfigError("sweep: axes is empty; give at least one key: [values]")
        for key, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep: axes.{key} must be a non-empty list of values")
            if key != CONFIG_AXIS and ("=" in key or key.startswith(".")):
                raise ConfigError(f"sweep: axes key {key!r} is not a dotted config key")
        if CONFIG_AXIS not in self.axes and not self.base:
            raise ConfigError("sweep: give the run config in base: [file.yaml] or as a `config` axis")
        for ex in self.exclude:
            unknown = set(ex) - set(self.axes)
            if unknown:
                raise ConfigError(f"sweep: exclude names keys that are not axes: {sorted(unknown)}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("sweep: concurrency and max_attempts must be >= 1")
        if self.resources.num_workers < 1 or self.resources.eval_actors < 0:
            raise ConfigError("sweep: resources.num_workers must be >= 1 and eval_actors >= 0")
        bad = [o for o in self.overrides + self.eval.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"sweep: overrides must look like key=value, got {bad}")
        self.monitor.validate()


__all__ = ["CONFIG_AXIS", "CellResources", "EvalSettings", "PlotSettings", "SweepConfig", "load_sweep_config"]


def load_sweep_config(path, overrides=()) -> SweepConfig:
    """:func:`smat_dist.config.load_config` of one sweep file, with ``axes`` open to any keys."""
    return load_config(SweepConfig, [path], list(overrides), open_keys=("axes",))
