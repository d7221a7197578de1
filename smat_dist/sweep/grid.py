"""Expand a sweep config into cells: one resolved, validated run config per point of the grid.

A cell's identity is a hash of what determines its numbers (the resolved run config without output
paths and worker counts, plus the evaluation settings), so re-running a sweep finds its finished
cells again, and editing a setting makes new cells instead of silently reusing stale ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from smat_dist.config import RunConfig, load_config, to_dict
from smat_dist.errors import ConfigError
from smat_dist.sweep.config import CONFIG_AXIS, SweepConfig

# Run-config keys that place a run or size its workers but do not change its numbers (world-size
# invariance is by construction and tested), so they are left out of a cell's identity.
PLACEMENT_KEYS = (
    ("train", "output_dir"), ("train", "run_name"), ("dist", "storage_path"), ("dist", "resume_from"),
    ("dist", "num_workers"), ("dist", "cpus_per_worker"), ("dist", "gpus_per_worker"), ("dist", "local_num_cpus"),
    ("dist", "object_store_mb"), ("dist", "max_failures"), ("dist", "staging_dir"), ("monitor",), ("data", "num_actors"),
    ("data", "actor_cpus"), ("data", "max_in_flight"), ("data", "local_root"), ("data", "max_open_files"),
    ("data", "actor_start_timeout_s"), ("data", "colocate"), ("data", "cache_dir"), ("data", "cache_max_gb"),
    ("data", "prefetch_shards"), ("data", "remote"), ("debug",),
)

# Keys added after cells were published, with the value that reproduces the code before them: left out of
# the identity while they hold it, so a sweep run before the key existed still finds its finished cells.
LATER_KEYS = (
    (("model", "lagrangian", "kp"), 0.0),
    (("model", "gates", "alpha_grad"), "flush"),  # the default; "task" gives the same numbers too
)


@dataclass
class Cell:
    id: str  # directory-safe: readable axis values + identity hash
    key: str  # identity hash
    assignment: Dict[str, Any]  # axis -> value of this cell
    configs: List[Path]  # run YAMLs
    overrides: List[str]  # run key=value (sweep overrides, axis values, resources), without output paths
    run: RunConfig = field(repr=False)  # resolved, for the derived columns of sweep.csv


def dotlist_value(value: Any) -> str:
    """A value as the right-hand side of ``key=value`` (YAML flow; JSON is valid YAML)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_./:+-]+", value) and \
            value.lower() not in ("true", "false", "null", "none", "yes", "no", "on", "off") and \
            not re.fullmatch(r"[-+.0-9eE]+", value):
        return value
    return json.dumps(value)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _label(key: str, value: Any) -> str:
    if key == CONFIG_AXIS:
        paths = value if isinstance(value, list) else [value]
        text = "+".join(Path(str(p)).stem for p in paths)
    elif isinstance(value, list):
        text = "+".join(str(v) for v in value)
        if len(text) > 24:
            text = f"{len(value)}of-" + hashlib.sha256(json.dumps(value).encode()).hexdigest()[:4]
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{_short(key)}-{text}")


def resolve_paths(value: Any, sweep_dir: Path, where: str) -> List[Path]:
    """Run YAML path(s): relative to the sweep file, else to the current directory."""
    out = []
    for p in (value if isinstance(value, list) else [value]):
        p = Path(str(p)).expanduser()
        cands = [p] if p.is_absolute() else [sweep_dir / p, Path.cwd() / p]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{where}: run config {p} not found (looked in {', '.join(str(c.parent) for c in cands)})")
        out.append(found.resolve())
    return out


def identity(run: RunConfig, eval_args: Sequence[str], assignment: Dict[str, Any]) -> str:
    """Hash of the run config minus placement keys, the evaluation settings and the cell's axis values
    (an axis over a placement key such as dist.num_workers still gives distinct cells)."""
    d = to_dict(run)

    def parent(path: tuple) -> dict:
        node = d
        for k in path[:-1]:
            node = node.get(k, {})
        return node

    for path in PLACEMENT_KEYS:
        parent(path).pop(path[-1], None)
    for path, neutral in LATER_KEYS:
        node = parent(path)
        if path[-1] in node and node[path[-1]] == neutral:
            del node[path[-1]]
    blob = json.dumps({"run": d, "eval": list(eval_args), "axes": assignment}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _matches(assignment: Dict[str, Any], pattern: Dict[str, Any]) -> bool:
    return all(json.dumps(assignment[k], sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in pattern.items())


def expand(cfg: SweepConfig, sweep_file: Path, eval_args: Sequence[str] = (),
           only: Optional[Dict[str, Any]] = None) -> List[Cell]:
    """Every cell of the grid, in axis order; each run config is loaded and validated here, so a bad
    value fails the sweep before anything runs, naming the cell."""
    sweep_dir = sweep_file.resolve().parent
    keys = list(cfg.axes)
    cells: List[Cell] = []
    for values in itertools.product(*(cfg.axes[k] for k in keys)):
        assignment = dict(zip(keys, values))
        if any(_matches(assignment, ex) for ex in cfg.exclude):
            continue
        if only and not _matches(assignment, {k: v for k, v in only.items() if k in assignment}):
            continue
        where = f"{sweep_file}: cell {json.dumps(assignment)}"
        configs = resolve_paths(assignment.get(CONFIG_AXIS, cfg.base), sweep_dir, where)
        overrides = list(cfg.overrides)
        overrides += [f"{k}={dotlist_value(v)}" for k, v in assignment.items() if k != CONFIG_AXIS]
        overrides += cfg.resources.train_overrides()
        try:
            run = load_config(RunConfig, configs, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        key = identity(run, eval_args, {k: v for k, v in assignment.items() if k != CONFIG_AXIS})
        label = "_".join(_label(k, v) for k, v in assignment.items())[:90]
        cells.append(Cell(f"{label}_{key}", key, assignment, configs, overrides, run))
    if not cells:
        raise ConfigError(f"{sweep_file}: the grid has no cells (everything excluded or filtered)")
    return cells


__all__ = ["Cell", "PLACEMENT_KEYS", "dotlist_value", "expand", "identity", "resolve_paths"]
