"""Node-local cache of remote shards: whole files, checked, kept within a byte budget.

Readers of a remote root (see :mod:`smat_dist.data.location`) still read images by byte offset,
but from a local copy of the shard: the first use of a shard on a node fetches it whole, in one
sequential read through webdataset's opener, checks its size and sha256 against the manifest and
keeps it under ``data.cache_dir``. Several actors and processes share one cache directory:

* entries are content-addressed (``objects/<sha[:2]>/<sha256><suffix>``): a dataset that is
  re-uploaded with different bytes gets new entries, never stale ones;
* a download goes to ``partial/<sha>.<size>.<host>.<pid>.<n>.part`` and is renamed into place only
  after its checks pass, so no reader ever sees a partial shard; one process per entry downloads
  (a striped ``flock`` in ``locks/``), the others wait for it and then read its copy;
* the budget ``data.cache_max_gb`` covers the entries plus the declared size of every download in
  progress: room is made, under a cache-wide lock, before a download starts, by deleting whole
  entries in least-recently-used order (readers refresh an entry's mtime as they use it). Readers
  open an entry per read, so an evicted entry's disk space is free as soon as the read in
  progress ends, and a reader that finds its entry gone fetches it again;
* a download reads through :func:`~smat_dist.data.location.open_url`, so the deadlines and retries
  of ``data.remote`` apply (a silent or stalled server ends the download; its partial file is
  removed on every way out); a download that arrives corrupt or short is retried up to
  ``attempts`` times, then :class:`DataError` names the URL;
* entry and partial-file names are built only from a checked sha256 (64 lowercase hex digits)
  and a checked suffix, so a manifest cannot point the cache outside its directory.

webdataset's own ``FileCache`` is not used: it has no checksums, checks the budget only
periodically and has no cross-process locking; only its URL openers are.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import os
import queue
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

from smat_dist.data.format import SHA256_RE, DataError
from smat_dist.data.deadline import RemoteReadError
from smat_dist.data.location import failure, open_url
from smat_dist.fsutil import pid_alive

log = logging.getLogger(__name__)

GiB = 1 << 30
STALE_PARTIAL_S = 1800.0  # a partial file not written for this long belongs to a dead download
TOUCH_EVERY_S = 10.0  # how often a reader refreshes an entry's mtime (its LRU time)
_SUFFIX_RE = re.compile(r"^(\.[A-Za-z0-9]{1,8})?$")


class Ref(NamedTuple):
    """One remote file as its manifest records it."""

    url: str
    sha256: str
    size: int
    name: str  # relative path (for the entry's suffix and for messages)


_serial = itertools.count()


class ShardCache:
    """See the module docstring. Thread-safe; one instance per reader is fine (state is on disk)."""

    def __init__(self, directory: str | Path, max_bytes: int, *, limits: Any = None, retries: Optional[int] = None,
                 wait_s: float = 600.0, retry_delay_s: Optional[float] = None):
        if limits is None:
            from smat_dist.data.config import RemoteConfig

            limits = RemoteConfig()
        self.limits = limits  # data.remote: deadlines and retries of each download
        self.dir = Path(os.path.expandvars(str(directory))).expanduser()
        self.max_bytes = int(max_bytes)
        self.retries = max(1, int(limits.attempts if retries is None else retries))
        self.wait_s = float(wait_s)
        self.retry_delay_s = float(limits.retry_backoff_s if retry_delay_s is None else retry_delay_s)
        self.objects, self.partial, self.locks = self.dir / "objects", self.dir / "partial", self.dir / "locks"
        for d in (self.objects, self.partial, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace(".", "-")
        self._touched: Dict[str, float] = {}
        self._checked: Set[str] = set()
        self._mu = threading.Lock()
        self.counters: Dict[str, float] = {"cache_downloads": 0, "cache_bytes_downloaded": 0, "cache_evictions": 0,
                                           "cache_retries": 0, "cache_download_seconds": 0.0}

    # -- reading ------------------------------------------------------------------------

    def entry(self, ref: Ref) -> Path:
        """Where ``ref`` is kept: built from its checked sha256 and suffix only."""
        suffix = Path(ref.name).suffix
        if not isinstance(ref.sha256, str) or not SHA256_RE.match(ref.sha256) or not _SUFFIX_RE.match(suffix):
            raise DataError(f"{ref.url}: manifest sha256 {str(ref.sha256)[:80]!r} or name {ref.name[:80]!r} is "
                            "malformed (64 lowercase hex digits, a plain suffix); refused")
        return self.objects / ref.sha256[:2] / (ref.sha256 + suffix)

    def has(self, ref: Ref) -> bool:
        try:
            return self.entry(ref).stat().st_size == ref.size
        except FileNotFoundError:
            return False

    def pread(self, ref: Ref, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the file, fetched into the cache first if needed."""
        p = self.entry(ref)
        for _ in range(4):
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                self.fetch(ref)
                continue
            try:
                if ref.sha256 not in self._checked:  # entries only appear whole, but say so once
                    if os.fstat(fd).st_size != ref.size:
                        raise DataError(f"cache entry {p} has {os.fstat(fd).st_size} bytes, manifest says "
                                        f"{ref.size} for {ref.url}; delete it")
                    self._checked.add(ref.sha256)
                self._touch(p)
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        raise DataError(f"{ref.url}: evicted from the shard cache {self.dir} before it could be read; "
                        f"data.cache_max_gb ({self.max_bytes / GiB:g}) is too small for the shards in use")

    def fetch(self, ref: Ref) -> Path:
        """The local entry of ``ref``, downloaded (checked, within budget) if absent."""
        p = self.entry(ref)
        if self.has(ref):
            self._touch(p, force=True)
            return p
        if ref.size > self.max_bytes:
            raise DataError(f"{ref.url}: {ref.size} bytes do not fit the shard cache budget "
                            f"({self.max_bytes} bytes, data.cache_max_gb)")
        with self._flock(self.locks / f"{ref.sha256[:2]}.lock"):
            if self.has(ref):  # another process fetched it while we waited
                self._touch(p, force=True)
                return p
            last = ""
            for attempt in range(1, self.retries + 1):
                part = self._reserve(ref)
                t0 = time.perf_counter()
                try:
                    try:
                        got, n = self._download(ref, part)
                    except RemoteReadError as exc:  # its deadlines and retries are spent: say so once
                        raise DataError(str(exc)) from None
                    if n != ref.size:
                        last = f"{'short' if n < ref.size else 'long'} download: {n} bytes, manifest says {ref.size}"
                    elif got != ref.sha256:
                        last = "sha256 differs from the manifest (corrupt download)"
                    else:
                        p.parent.mkdir(exist_ok=True)
                        # under the cache-wide lock: a budget scan must see these bytes either as
                        # the reservation or as the entry, never (mid-rename) as neither
                        with self._flock(self.dir / ".lock"):
                            os.replace(part, p)
                        with self._mu:
                            self.counters["cache_downloads"] += 1
                            self.counters["cache_bytes_downloaded"] += n
                            self.counters["cache_download_seconds"] += time.perf_counter() - t0
                        return p
                except (OSError, ValueError) as exc:
                    last = failure(exc)
                finally:
                    part.unlink(missing_ok=True)
                with self._mu:
                    self.counters["cache_retries"] += 1
                log.warning("download %d/%d of %s failed: %s", attempt, self.retries, ref.url, last)
                if attempt < self.retries:
                    time.sleep(self.retry_delay_s * attempt)
        raise DataError(f"{ref.url}: download failed {self.retries} times: {last}")

    def _download(self, ref: Ref, part: Path) -> Tuple[str, int]:
        with open(part, "r+b") as out, open_url(ref.url, self.limits) as src:
            try:
                return copy_checked(src, out, ref.size, progress=lambda: os.utime(part))
            finally:
                with self._mu:
                    self.counters["cache_retries"] += getattr(src, "retries", 0)

    def _touch(self, p: Path, force: bool = False) -> None:
        now = time.time()
        key = str(p)
        if force or now - self._touched.get(key, 0.0) > TOUCH_EVERY_S:
            try:
                os.utime(p)
            except FileNotFoundError:
                pass
            self._touched[key] = now

    # -- budget -------------------------------------------------------------------------------

    @contextmanager
    def _flock(self, path: Path) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reserve(self, ref: Ref) -> Path:
        """Make room for ``ref`` (evicting LRU entries) and create its partial file, atomically
        with respect to every other process using this cache."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with self._flock(self.dir / ".lock"):
                entries, reserved = self._scan()
                used = sum(s for _, s, _ in entries) + reserved
                entries.sort()  # oldest first
                while used + ref.size > self.max_bytes and entries:
                    _, size, path = entries.pop(0)
                    try:
                        path.unlink()
                        used -= size
                        with self._mu:
                            self.counters["cache_evictions"] += 1
                        log.info("shard cache: evicted %s (%d bytes)", path.name, size)
                    except FileNotFoundError:
                        used -= size
                if used + ref.size <= self.max_bytes:
                    part = self.partial / f"{ref.sha256}.{ref.size}.{self._host}.{os.getpid()}.{next(_serial)}.part"
                    os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                    return part
            if time.monotonic() > deadline:  # only other downloads' reservations are left
                raise DataError(f"{ref.url}: no room in the shard cache {self.dir} for {self.wait_s:.0f}s: "
                                f"downloads in progress hold {reserved} of {self.max_bytes} bytes "
                                "(raise data.cache_max_gb)")
            time.sleep(0.2)

    def _scan(self) -> Tuple[List[Tuple[float, int, Path]], int]:
        """Complete entries as (mtime, size, path) and the bytes reserved by live downloads;
        partial files of dead downloads are removed."""
        entries = []
        for sub in self.objects.iterdir():
            for p in sub.iterdir() if sub.is_dir() else ():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        reserved = 0
        now = time.time()
        for p in self.partial.iterdir():
            parts = p.name.split(".")
            try:
                size, host, pid = int(parts[1]), parts[2], int(parts[3])
                age = now - p.stat().st_mtime
            except (IndexError, ValueError, FileNotFoundError):
                continue
            dead = age > STALE_PARTIAL_S or (host == self._host and not pid_alive(pid))
            if dead:
                p.unlink(missing_ok=True)
            else:
                reserved += size
        return entries, reserved

    def usage(self) -> int:
        """Bytes on disk now: entries plus partial downloads. Read under the cache-wide lock, so it
        is a consistent snapshot (reserving, and moving a finished download into place, hold that
        lock); it never exceeds ``max_bytes``."""
        with self._flock(self.dir / ".lock"):
            n = 0
            for p in itertools.chain(self.objects.glob("*/*"), self.partial.iterdir()):
                try:
                    n += p.stat().st_size
                except FileNotFoundError:
                    pass
            return n

    def stats(self) -> Dict[str, float]:
        with self._mu:
            return dict(self.counters)


def copy_checked(src: BinaryIO, out: BinaryIO, size: int, progress: Optional[Callable[[], None]] = None
                 ) -> Tuple[str, int]:
    """Copy at most ``size`` bytes of ``src`` to ``out``, hashing. Returns (sha256, byte count) for
    the caller to compare with the manifest; a longer stream counts one byte more, unwritten."""
    h = hashlib.sha256()
    n = 0
    while n < size:
        b = src.read(min(1 << 20, size - n))
        if not b:
            break
        out.write(b)
        h.update(b)
        n += len(b)
        if progress is not None:
            progress()  # a partial file that grows is not stale
    if n == size and src.read(1):
        n += 1
    return h.hexdigest(), n


class Prefetcher:
    """Background fetches into a :class:`ShardCache` for shards the next episodes will read.

    At most ``limit`` shards are queued or downloading at a time (per prefetcher, i.e. per episode
    actor); shards already cached, or already queued, are not asked for again. A failed prefetch is
    only logged: the episode that needs the shard fetches it itself and reports the error.
    """

    def __init__(self, cache: ShardCache, limit: int):
        self.cache = cache
        self.limit = int(limit)
        self._q: "queue.Queue[Optional[Ref]]" = queue.Queue()
        self._pending: Set[str] = set()
        self._mu = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def want(self, refs: Iterable[Ref]) -> int:
        """Queue the refs (in order) that are neither cached nor pending, up to the bound."""
        n = 0
        for ref in refs:
            with self._mu:
                if len(self._pending) >= self.limit:
                    break
                if ref.sha256 in self._pending:
                    continue
            if self.cache.has(ref):
                continue
            with self._mu:
                self._pending.add(ref.sha256)
            self._q.put(ref)
            n += 1
        return n

    @property
    def pending(self) -> int:
        with self._mu:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            ref = self._q.get()
            if ref is None:
                return
            try:
                self.cache.fetch(ref)
            except Exception as exc:  # the reader will fetch (and report) it itself
                log.warning("prefetch of %s failed: %s", ref.url, exc)
            finally:
                with self._mu:
                    self._pending.discard(ref.sha256)

    def close(self, timeout: float = 5.0) -> None:
        """Drop what is still queued, let a download in progress finish (up to ``timeout``)."""
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)
        self._thread.join(timeout)


__all__ = ["GiB", "Prefetcher", "Ref", "ShardCache", "copy_checked"]
