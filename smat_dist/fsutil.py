"""Crash-safe file writes: a file a later step reads is either the old one or the whole new one.

Write to a temporary name in the same directory, flush and fsync it, rename over the target, then
fsync the directory so the rename itself survives a power loss.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, Path]


def fsync_dir(directory: PathLike) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) do not sync directories
    finally:
        os.close(fd)


def tmp_path_for(path: PathLike) -> Path:
    """A temporary name next to ``path``, unique per process and thread (concurrent writers never share one)."""
    import threading

    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def publish(tmp: PathLike, path: PathLike) -> Path:
    """fsync ``tmp`` (a file or a directory tree) and rename it to ``path``; fsync the parent."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        for sub in sorted(tmp.rglob("*")):
            if sub.is_file():
                _fsync_file(sub)
        for sub in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            fsync_dir(sub)
        if path.exists():
            shutil.rmtree(path)
    else:
        _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def read_json(path: PathLike, error: type, what: str) -> Any:
    """The JSON in ``path``, or ``error`` with one line naming the file (a missing file names ``what``
    it should have been), so every reader of a user-supplied JSON file fails the same way."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{p}: not valid JSON: {exc}") from None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) still runs: files it left (a lock, a download, an
    announcement) are someone's as long as it does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Locked(RuntimeError):
    """A directory another process holds (:class:`DirLock`); ``holder`` says who."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/<name>``, held while the ``with`` body runs:
    one writer per directory (a run, a sweep). The OS releases it when the holder exits, however it
    exits (kill -9 included), so a crash never leaves a stale lock. The file says who holds it (host,
    pid, start time) for the refusal message; ``what`` names the holder's kind in that message.

    Local filesystems, and NFSv4 mounts (which carry flock as byte-range locks), serve it; an object
    store does not: a run stored there locks a state file on the driver's local disk instead
    (:func:`run_lock`)."""

    def __init__(self, directory: PathLike, name: str = ".lock", what: str = "another process"):
        self.path = Path(directory) / name
        self.what = what
        self._fd: Optional[int] = None

    def holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {"pid": data}

    def __enter__(self) -> "DirLock":
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
            raise Locked(f"{self.path.parent} is in use by {self.what} (host {h.get('host', '?')}, pid "
                         f"{h.get('pid', '?')}, started {started})", h) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_writable_dir(path: PathLike, what: str) -> Path:
    """``path`` (expanded) if it is, or can be created as, a directory this process may write; else
    NotADirectoryError / PermissionError naming it and ``what`` (the setting or option it came from).
    Checked before work starts, so a bad output path costs a second, not a run."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    existing = p if p.exists() else next((q for q in p.parents if q.exists()), None)
    if existing is None:
        raise PermissionError(f"{p}: no existing parent directory ({what})")
    if not existing.is_dir():
        raise NotADirectoryError(f"{p}: {existing} is a file, not a directory ({what})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{p}: {existing} is not writable ({what})")
    return p


__all__ = ["DirLock", "Locked", "check_writable_dir", "pid_alive", "read_json", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "publish", "fsync_dir", "tmp_path_for"]
