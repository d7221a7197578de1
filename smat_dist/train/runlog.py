"""The run's log file and the one-line error a user sees.

``<run_dir>/train.log`` collects what rank 0 prints (progress, resume points) and the full traceback of
any error, from whichever process or rank raised it. The console gets one line per error: the
message (for the errors a user can fix: a bad config, data root, checkpoint or weights file) or the
exception type and its first line, with the rank it came from and where the traceback is.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Optional, Tuple

from smat_dist.train.preflight import USER_ERRORS

RUN_LOG = "train.log"


def append(run_dir: Optional[Path], text: str) -> None:
    if run_dir is None:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / RUN_LOG, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}\n")
    except OSError:
        pass  # the log must never be the reason a run fails


def log_exception(run_dir: Optional[Path], exc: BaseException, where: str = "") -> None:
    """The full traceback into the run's log file (once per exception object)."""
    if getattr(exc, "_smat_logged", False):
        return
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    append(run_dir, f"error{(' on ' + where) if where else ''}:\n{tb}")
    try:
        exc._smat_logged = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


def root_cause(exc: BaseException) -> Tuple[BaseException, Optional[int]]:
    """The exception a user should read, and the rank it came from, out of Ray Train's wrappers."""
    rank = None
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank = min(failures)
        exc = failures[rank]
    exc = getattr(exc, "controller_failure", None) or exc  # ray.train.ControllerError
    exc = getattr(exc, "_base_exc", None) or exc  # Ray Train's UserExceptionWithTraceback
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        exc = cause
    return exc, rank


def one_line(exc: BaseException) -> str:
    cause, rank = root_cause(exc)
    text = str(cause).strip().splitlines()
    first = text[0] if text else ""
    line = first if isinstance(cause, USER_ERRORS) else f"{type(cause).__name__}: {first}"
    return f"rank {rank}: {line}" if rank is not None else line


__all__ = ["RUN_LOG", "append", "log_exception", "root_cause", "one_line"]
