"""Episodes built ahead in a background thread, for the launchers without Ray actors.

Under Ray, actors build the next ``data.max_in_flight`` episodes while the rank trains. The torchrun
ranks and the single process build theirs in-process; :class:`Prefetched` runs that same iterator in
one background thread, ``depth`` episodes ahead, so building (shard reads, JPEG decode, resize; torch
and PIL release the GIL) overlaps the meta-step. One thread and a FIFO queue keep the order exactly
that of the iterator; an error while building is raised in the consumer, at the episode it broke.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional, TypeVar

T = TypeVar("T")

_END = object()


class Prefetched(Iterator[T]):
    """``iter(source)`` read up to ``depth`` items ahead by a daemon thread; ``close()`` stops it."""

    def __init__(self, source: Iterator[T], depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(source),), name="episode-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        self._put(_END)

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the episode it is building) and drop what it built."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)


__all__ = ["Prefetched"]
