"""Sequential passes over whole shards with webdataset's own pipeline, checked against the manifest.

Where every sample of a split is wanted in order (``smat-data verify`` of a URL root, the demo's
pre-training pass), the shards are streamed, not fetched into the cache: ``webdataset``'s
``SimpleShardList -> (open) -> tar_file_expander -> group_by_keys`` yields samples as dicts
(``__key__``, ``__url__``, ``jpg``/``png``/``npy``, ``cls``, ``json``). The open stage is ours
only to count and hash the bytes as they pass: when a shard's stream is exhausted its size and
sha256 are compared with the manifest and ``on_shard`` is told the outcome (it may raise).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from smat_dist.data.cache import Ref
from smat_dist.data.format import DataError
from smat_dist.data.location import failure, open_url

# on_shard(ref, problem): problem is None when the shard matched its manifest record
ShardCallback = Callable[[Ref, Optional[str]], None]


class HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, stream):
        self.stream = stream
        self.sha = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        b = self.stream.read(size)
        self.sha.update(b)
        self.n += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def raise_on_mismatch(ref: Ref, problem: Optional[str]) -> None:
    if problem is not None:
        raise DataError(f"{ref.url}: {problem}")


def _checked_streams(refs: List[Ref], on_shard: ShardCallback, limits: Any):
    """Pipeline stage: ``dict(url=...)`` -> ``dict(url=..., stream=...)``; checks each stream
    (drained to its end) once the tar expander has moved on from it. Streams are opened with
    :func:`~smat_dist.data.location.open_url` (the deadlines and retries of ``limits``)."""
    by_url = {r.url: r for r in refs}

    def stage(src: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for sample in src:
            ref = by_url[sample["url"]]
            try:
                reader = HashingReader(open_url(ref.url, limits))
            except (OSError, ValueError) as exc:
                on_shard(ref, f"unreadable ({failure(exc)})")
                continue
            yield dict(sample, stream=reader)
            problem = None
            try:
                reader.drain()  # end-of-archive padding the tar reader did not need
                reader.close()
            except (OSError, ValueError) as exc:
                problem = f"read failed ({failure(exc)})"
            if problem is None and reader.n != ref.size:
                problem = f"{reader.n} bytes, manifest says {ref.size} (short or altered shard)"
            elif problem is None and reader.sha.hexdigest() != ref.sha256:
                problem = "sha256 mismatch (corrupted shard)"
            on_shard(ref, problem)

    return stage


def shard_samples(refs: List[Ref], on_shard: ShardCallback = raise_on_mismatch, *,
                  limits: Any = None) -> Iterator[Dict[str, Any]]:
    """Every sample of ``refs``, in order, through webdataset's tar pipeline (see module docstring).
    ``limits``: a RemoteConfig (``data.remote``; defaults if None)."""
    if not refs:
        return iter(())
    import webdataset as wds

    if limits is None:
        from smat_dist.data.config import RemoteConfig

        limits = RemoteConfig()

    return iter(wds.DataPipeline(
        wds.SimpleShardList([r.url for r in refs]),
        _checked_streams(refs, on_shard, limits),
        wds.tariterators.tar_file_expander,
        wds.tariterators.group_by_keys,
    ))


__all__ = ["HashingReader", "raise_on_mismatch", "shard_samples"]
