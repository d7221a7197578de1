"""Sweep state on disk: one JSON file per cell, written atomically, and a lock per sweep directory.

A crash can only ever leave the previous complete version of a file (write to a temporary, fsync,
``os.replace``). An attempt that was running when the sweep died has no end time; on restart it
counts as interrupted, not failed, and the cell simply runs again (training resumes from the run's
last checkpoint, by run name).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from smat_dist.fsutil import DirLock, Locked, atomic_write_json

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class Attempt:
    started: float
    ended: Optional[float] = None
    outcome: str = "running"  # running | done | failed | interrupted
    phase: str = "train"  # train | eval | results
    returncode: Optional[int] = None
    error: str = ""
    log: str = ""


@dataclass
class CellState:
    id: str
    key: str
    assignment: Dict[str, Any]
    status: str = PENDING
    attempts: List[Attempt] = field(default_factory=list)
    train_done: bool = False  # training finished and exported; a retry only re-runs evaluation
    train_s: float = 0.0  # wall seconds of the successful phases (sum over attempts that got there)
    eval_s: float = 0.0
    results: Dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "failed")

    @property
    def last_error(self) -> str:
        failed = [a for a in self.attempts if a.outcome == "failed"]
        return failed[-1].error if failed else ""

    def recover(self) -> None:
        """After a crash: an attempt without an end was interrupted; a running cell is pending again."""
        for a in self.attempts:
            if a.ended is None:
                a.ended, a.outcome = time.time(), "interrupted"
        if self.status == RUNNING:
            self.status = PENDING

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CellState":
        d = dict(d)
        d["attempts"] = [Attempt(**a) for a in d.get("attempts", [])]
        return cls(**d)


class CellStore:
    """``<out>/cells/<id>.json``."""

    def __init__(self, out: Path):
        self.dir = out / "cells"

    def path(self, cell_id: str) -> Path:
        return self.dir / f"{cell_id}.json"

    def load(self, cell_id: str) -> Optional[CellState]:
        p = self.path(cell_id)
        if not p.exists():
            return None
        try:
            return CellState.from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise SweepStateError(f"{p}: corrupt cell state ({type(exc).__name__}: {exc}); move it away to run the "
                                  f"cell afresh (its training resumes from its checkpoints)") from None

    def save(self, st: CellState) -> None:
        atomic_write_json(self.path(st.id), st.to_json())


class SweepLock(DirLock):
    """One driver per sweep directory: :class:`~smat_dist.fsutil.DirLock` on ``<out>/.lock``."""

    def __init__(self, out: Path):
        super().__init__(out, ".lock", what="another smat-sweep")

    def __enter__(self) -> "SweepLock":
        try:
            return super().__enter__()
        except Locked as exc:
            raise SweepLocked(str(exc)) from None


class SweepLocked(RuntimeError):
    pass


class SweepStateError(ValueError):
    """A cell state file that cannot be read; the message names it."""


__all__ = ["Attempt", "CellState", "CellStore", "SweepLock", "SweepLocked", "SweepStateError", "PENDING", "RUNNING",
           "DONE", "FAILED"]
