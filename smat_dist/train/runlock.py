"""One writer per run directory: a lock every launcher holds for the life of a run.

Two runs with the same ``train.run_name`` would interleave their metrics rows and checkpoints. The
launching process (the single process, torchrun's rank 0, the Ray driver, which is the job's entrypoint
under ``ray job submit``) takes :class:`~smat_dist.fsutil.DirLock` on ``<run_dir>/.run.lock`` before
anything is checked or written; a second run is refused in one line naming the holder, and a crash
releases the lock with the process. The Ray workers and other ranks take none: they are the run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from smat_dist.fsutil import DirLock, Locked

LOCK_NAME = ".run.lock"


class RunLocked(RuntimeError):
    """The run directory is held by another run (a user error: exit 2)."""


class RunLock(DirLock):
    def __init__(self, directory: Path, shown: str):
        super().__init__(directory, LOCK_NAME, what="another run")
        self.shown = shown

    def __enter__(self) -> "RunLock":
        try:
            return super().__enter__()
        except Locked as exc:
            msg = str(exc).replace(str(self.path.parent), self.shown, 1)
            raise RunLocked(f"{msg}: wait for it to end, stop it, or choose another train.run_name") from None


def run_lock(run_dir: str | Path) -> RunLock:
    """The lock of ``run_dir``. A run directory on object storage (``scheme://``) cannot carry a lock, so
    its lock is a state file on this machine's disk (``$SMAT_STATE_DIR``, default ``~/.cache/smat-dist``)
    keyed by the URL: it keeps out a second driver on the same machine (the head, under ``ray job
    submit``), not one elsewhere."""
    text = str(run_dir)
    if "://" in text:
        state = Path(os.environ.get("SMAT_STATE_DIR", "~/.cache/smat-dist")).expanduser() / "run-locks"
        return RunLock(state / hashlib.sha256(text.encode()).hexdigest()[:24], text)
    return RunLock(Path(run_dir), text)


__all__ = ["run_lock", "RunLock", "RunLocked", "LOCK_NAME"]
