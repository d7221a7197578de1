"""Deadlines and retries for one remote file, whatever opener serves it.

A blocking ``read()`` on a stream from curl, a ``pipe:`` command or an object-store client cannot
be interrupted from the thread that called it, so :class:`GuardedReader` reads the stream in a
helper thread (up to ``AHEAD`` chunks ahead) and waits for each chunk with a timeout. Three limits
(``data.remote``, :class:`~smat_dist.data.config.RemoteConfig`):

* connect: the opener must return a stream within ``connect_timeout_s``;
* stall: a wait for the next byte may last at most ``stall_timeout_s``;
* file: the waits for one attempt's bytes may add up to at most ``file_timeout_s``. Only time
  the reader spends *waiting* counts, so a consumer that trains between reads (the streaming
  pre-training pass) does not use up the deadline.

A failed attempt is abandoned (its process, if it has one, is killed; a stream that cannot be
interrupted is left to its helper thread, which closes it when its read returns) and the file is
opened again after ``retry_backoff_s`` (doubled each time): the bytes already delivered are read
again and skipped, so the consumer sees one uninterrupted stream, whose checksum it checks as
before. After ``attempts`` attempts, :class:`RemoteReadError` names the URL and the last reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, BinaryIO, Callable, List, Optional

log = logging.getLogger(__name__)

CHUNK = 1 << 20
AHEAD = 4  # chunks read ahead of the consumer (memory per open stream: AHEAD MiB)


class RemoteReadError(OSError):
    """A remote file could not be read within its limits; the message names the URL.
    ``retry`` is False for answers that another attempt would not change (HTTP 404, a refused
    redirect)."""

    def __init__(self, reason: str, *, url: str = "", retry: bool = True):
        super().__init__(f"{url}: {reason}" if url else reason)
        self.url, self.reason, self.retry = url, reason, retry

    def __str__(self) -> str:
        return str(self.args[0])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RemoteReadError):
        return exc.reason
    from smat_dist.data.location import failure

    return failure(exc)


def abandon(stream: Any) -> None:
    """Stop a stream that another thread may be blocked reading: kill its process if it has one
    (the read then sees end of file). Never closes it here: closing a buffered file that another
    thread is reading blocks on that thread's lock."""
    proc = getattr(stream, "proc", None)
    if proc is not None:
        try:
            proc.kill()
        except (OSError, ValueError):
            pass


def read_some(stream: Any, size: int) -> bytes:
    """Up to ``size`` bytes, as soon as some are there (``read1``), so that a slow but live
    source shows progress; webdataset's ``Pipe`` keeps its exit-status check."""
    if hasattr(stream, "read1"):
        return stream.read1(size)
    inner = getattr(stream, "stream", None)
    if hasattr(inner, "read1") and hasattr(stream, "wait_for_child"):
        b = inner.read1(size)
        if not b:
            stream.wait_for_child()  # end of output: the command's exit status decides
        return b
    return stream.read(size)


class _Attempt:
    """One open + read of the file in a helper thread, skipping the first ``skip`` bytes."""

    def __init__(self, url: str, opener: Callable[[], BinaryIO], skip: int):
        self.url, self.opener, self.skip = url, opener, skip
        self.q: "queue.Queue[tuple]" = queue.Queue(maxsize=AHEAD)
        self.stream: Optional[BinaryIO] = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="remote-read", daemon=True)
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            stream = self.opener()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("error", exc))
            return
        self.stream = stream
        try:
            ready = getattr(stream, "ready", None)
            if ready is not None:  # e.g. curl: connected and the response headers read
                ready()
            if self.stop.is_set() or not self._put(("open", None)):
                return
            left = self.skip
            while not self.stop.is_set():
                b = read_some(stream, min(CHUNK, left) if left else CHUNK)
                if not b:
                    if left:
                        raise RemoteReadError(f"ended after {self.skip - left} bytes on a retry that had "
                                              f"already delivered {self.skip} (file changed?)")
                    self._put(("eof", None))
                    return
                if left:
                    left -= len(b)
                    self._put(("skip", None))  # progress: the stall clock restarts
                elif not self._put(("data", b)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            if not self.stop.is_set():
                self._put(("error", exc))
        finally:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a killed process's exit status; the outcome is decided
                pass

    def abandon(self) -> None:
        self.stop.set()
        if self.stream is not None:
            abandon(self.stream)


class GuardedReader:
    """A read-only stream of ``url`` (see the module docstring). ``opener()`` returns a fresh
    stream of the whole file for each attempt; ``limits`` is a RemoteConfig."""

    def __init__(self, url: str, opener: Callable[[], BinaryIO], limits: Any):
        self.url, self.opener, self.limits = url, opener, limits
        self.delivered = 0
        self.retries = 0
        self._buf = b""
        self._eof = False
        self._closed = False
        self._attempt_no = 1
        self._start()

    def _start(self) -> None:
        self._att = _Attempt(self.url, self.opener, self.delivered)
        self._opened = False
        self._waited = 0.0

    def _fail(self, reason: str, retry: bool) -> None:
        self._att.abandon()
        if not retry or self._attempt_no >= self.limits.attempts:
            tries = f" ({self._attempt_no} attempts)" if self._attempt_no > 1 else ""
            raise RemoteReadError(f"{reason}{tries}", url=self.url, retry=False)
        delay = self.limits.retry_backoff_s * 2 ** (self._attempt_no - 1)
        log.info("%s: %s; attempt %d of %d in %.1fs", self.url, reason, self._attempt_no + 1,
                    self.limits.attempts, delay)
        time.sleep(delay)
        self._attempt_no += 1
        self.retries += 1
        self._start()

    def _next(self) -> None:
        """Wait for the next chunk into ``_buf`` (or end of file), within the limits."""
        lim = self.limits
        while True:
            if self._opened:
                limit = min(lim.stall_timeout_s, lim.file_timeout_s - self._waited)
                what = (f"no data for {lim.stall_timeout_s:g}s (data.remote.stall_timeout_s)"
                        if limit == lim.stall_timeout_s else
                        f"not read within {lim.file_timeout_s:g}s (data.remote.file_timeout_s)")
            else:
                limit, what = lim.connect_timeout_s, f"no answer within {lim.connect_timeout_s:g}s " \
                                                     "(data.remote.connect_timeout_s)"
            t0 = time.monotonic()
            try:
                kind, val = self._att.q.get(timeout=max(limit, 0.0))
            except queue.Empty:
                self._fail(what, retry=True)
                continue
            finally:
                if self._opened:
                    self._waited += time.monotonic() - t0
            if kind == "open":
                self._opened = True
            elif kind == "data":
                self._buf = val
                self.delivered += len(val)
                return
            elif kind == "eof":
                self._eof = True
                return
            elif kind == "error":
                self._fail(_reason(val), retry=getattr(val, "retry", True))

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, at least one unless at end of file (all that is left if ``size`` < 0),
        as a raw stream answers: consumers loop, and a slow source shows progress."""
        if self._closed:
            raise ValueError(f"{self.url}: read of a closed stream")
        if size is None or size < 0:
            parts: List[bytes] = []
            while True:
                b = self.read(CHUNK)
                if not b:
                    return b"".join(parts)
                parts.append(b)
        while not self._buf and not self._eof:
            self._next()
        take, self._buf = self._buf[:size], self._buf[size:]
        return take

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._att.abandon()

    def __del__(self) -> None:  # an abandoned reader must not leave its helper (and process) behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "GuardedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AHEAD", "CHUNK", "GuardedReader", "RemoteReadError", "abandon"]
