"""The cell reaper: cells never outlive the sweep driver, even one killed with SIGKILL.

Cells run in sessions of their own (so a timeout or Ctrl-C can stop a cell with everything it started),
which means killing the driver's process group no longer reaches them. The driver therefore starts this
module as a small process of its own (``python -S -m smat_dist.sweep.reaper GRACE_S``, standard library
only, so it starts in milliseconds and needs nothing installed) and tells it, on a pipe it alone writes,
which process groups are running: ``+<pgid>`` and ``-<pgid>`` lines. End of file means the driver is gone
(or closed the pipe after its last cell): every group still listed gets SIGTERM, then SIGKILL after the
grace period. The reaper ignores SIGINT/SIGHUP and lives in its own session, so neither Ctrl-C nor
killing the driver's process group stops it before it has done its job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional, Set

PKG_PARENT = str(Path(__file__).resolve().parents[2])  # the directory that holds the smat_dist package


def signal_groups(groups: Iterable[int], sig: int) -> Set[int]:
    """Send ``sig`` to every process group; the ones that still exist (signal 0 only checks)."""
    alive = set()
    for group in groups:
        try:
            os.killpg(group, sig)
            alive.add(group)
        except OSError:
            pass
    return alive


def reap(lines: Iterable[str], grace_s: float) -> None:
    """Follow the ``+pgid``/``-pgid`` lines to their end, then stop every group still listed."""
    groups: Set[int] = set()
    for line in lines:
        (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    groups = signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while groups and time.monotonic() < deadline:
        time.sleep(0.2)
        groups = signal_groups(groups, 0)
    signal_groups(groups, signal.SIGKILL)


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    reap(sys.stdin, float(args[0]))
    return 0


class CellReaper:
    """The driver's side: stops the process groups of running cells once the driver is gone, however it ended.

    Started on first use; ``watch``/``release`` register a cell's process group while it runs; ``close``
    (end of the sweep) lets it exit.
    """

    def __init__(self, grace_s: float = 20.0):
        self.grace_s = grace_s
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None:
                # -S and no PYTHON* settings of the driver's environment: the reaper imports only the
                # standard library and this module, so it starts even where the driver's set-up is broken.
                env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
                env["PYTHONPATH"] = PKG_PARENT
                self._proc = subprocess.Popen([sys.executable, "-S", "-m", __name__, str(self.grace_s)],
                                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                              start_new_session=True, env=env)
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def release(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=self.grace_s + 30)


__all__ = ["CellReaper", "reap", "signal_groups", "main"]

if __name__ == "__main__":
    sys.exit(main())
