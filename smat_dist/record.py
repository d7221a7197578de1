"""The run record: per-step training metrics as one typed record, the run's ``metrics.jsonl`` and
the vocabulary of its keys.

Training writes it; monitoring, evaluation analyses, sweep reports and the studies read it, so it
lives here, below all of them (nothing under ``smat_dist/{smat,data,eval,monitoring}`` imports
``smat_dist.train``). A :class:`StepMetrics` is what every launcher logs, prints and hands to
monitoring. Its JSON row (``row()``) is one line of ``metrics.jsonl``; ``from_row`` reads it back
(sweep reports, analyses, monitoring of rows written elsewhere). Fields that do not apply to a method
(teacher losses for PMF, sparsity without gates) stay ``None`` and are left out of the row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from smat_dist.fsutil import atomic_write_text

log = logging.getLogger(__name__)

# Per-task values the model reports (TaskOutput.metrics), averaged over the step's tasks and ranks.
TASK_KEYS = ("loss", "query_ce", "query_acc", "kd", "support_ce", "teacher_ce", "teacher_acc", "pre_acc",
             "lagrangian_term", "sparsity_penalty", "ways", "alpha_entropy", "time_teacher")
# Per-expert vectors of the step (identical on every rank).
EXPERT_KEYS = ("sparsity", "sparsity_test", "lambda", "expected_density")
# Wall-clock split of a rank's step, averaged over ranks.
TIME_KEYS = ("time_data", "time_student", "time_teacher", "time_backward", "time_allreduce_step")
# Groups of row keys by what they measure, each key with the label it is graphed under.
# Loss terms: row key -> term (``total`` is the optimised loss).
LOSS_KEYS = {"loss": "total", "query_ce": "query_ce", "support_ce": "support_ce", "kd": "kd",
             "teacher_ce": "teacher_ce", "sparsity_penalty": "sparsity_penalty", "lagrangian_term": "lagrangian_term"}
LOSS_TERMS = tuple(LOSS_KEYS.values())
# Query accuracies: row key -> model that reached it.
ACCURACY_KEYS = {"query_acc": "student", "teacher_acc": "teacher", "pre_acc": "pretrained"}
# Step-time split: row key -> phase. time_backward holds the backward pass and the engine step (where
# DeepSpeed all-reduces the meta-gradients and the optimiser steps).
PHASE_KEYS = {"time_data": "data", "time_student": "student", "time_teacher": "teacher",
              "time_backward": "backward_allreduce"}


@dataclass
class TaskRecord:
    """What the step remembers of one task beyond the averages: where it came from and its α."""

    source: str
    alpha: Optional[List[float]] = None


@dataclass
class StepMetrics:
    step: int = 0  # meta-steps completed (1-based)
    world_size: int = 1
    lr_mult: Optional[float] = None
    # task means
    loss: Optional[float] = None
    query_ce: Optional[float] = None
    query_acc: Optional[float] = None
    kd: Optional[float] = None
    support_ce: Optional[float] = None
    teacher_ce: Optional[float] = None
    teacher_acc: Optional[float] = None
    pre_acc: Optional[float] = None
    lagrangian_term: Optional[float] = None
    sparsity_penalty: Optional[float] = None
    ways: Optional[float] = None
    alpha_entropy: Optional[float] = None
    alpha_mean: Optional[List[float]] = None
    # per expert
    sparsity: Optional[List[float]] = None  # measured on the step's training gates
    sparsity_test: Optional[List[float]] = None  # of the deterministic test gates
    lagrange: Optional[List[float]] = None  # λ (row key "lambda")
    expected_density: Optional[List[float]] = None
    temperature: Optional[float] = None  # hypernetwork selection temperature
    # speed
    tasks_per_s: Optional[float] = None
    time_step: Optional[float] = None
    time_data: Optional[float] = None
    time_student: Optional[float] = None
    time_teacher: Optional[float] = None
    time_backward: Optional[float] = None
    time_allreduce_step: Optional[float] = None
    # consistency and breakdowns
    global_state_max_spread: Optional[float] = None  # max over ranks of |state - rank's state|
    grad_norms: Dict[str, float] = field(default_factory=dict)  # per optimiser group, before clipping
    alpha_by_source: Dict[str, List[float]] = field(default_factory=dict)  # mean α per training source
    data: Dict[str, float] = field(default_factory=dict)  # data-plane counters of this rank's loader
    tasks: List[TaskRecord] = field(default_factory=list, repr=False)  # this rank's tasks (not in the row)

    _RENAMES = {"lagrange": "lambda"}

    def row(self) -> Dict[str, Any]:
        """The ``metrics.jsonl`` line (None fields and the per-task records left out)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            if f.name == "tasks":
                continue
            v = getattr(self, f.name)
            if v is None or (isinstance(v, dict) and not v):
                continue
            out[self._RENAMES.get(f.name, f.name)] = v
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "StepMetrics":
        names = {f.name for f in fields(cls)} - {"tasks"}
        back = {v: k for k, v in cls._RENAMES.items()}
        kwargs = {}
        for k, v in row.items():
            k = back.get(k, k)
            if k in names:
                kwargs[k] = v
        return cls(**kwargs)

    def get(self, key: str) -> Any:
        """Row-keyed access (``"lambda"``, ``"loss"`` ...)."""
        return self.row().get(key)


class MetricsLog:
    """``metrics.jsonl``: one JSON line per logged step, appended by rank 0."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, m: StepMetrics) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(m.row()) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: keep the lines of steps <= ``step`` (they will not be re-run), drop the rest and any
        torn line a crash left, so nothing is lost or doubled."""
        if not self.path.exists():
            return
        rows = read_rows(self.path)
        keep = [json.dumps(r) for r in rows if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn or corrupt line (a crash mid-write) is skipped with a warning."""
    rows: List[Dict[str, Any]] = []
    text = Path(path).read_text(errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a torn metrics line (%d bytes)", path, n, len(line))
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


__all__ = ["StepMetrics", "TaskRecord", "MetricsLog", "read_rows", "TASK_KEYS", "EXPERT_KEYS", "TIME_KEYS",
           "LOSS_KEYS", "LOSS_TERMS", "ACCURACY_KEYS", "PHASE_KEYS"]
