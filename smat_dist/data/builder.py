"""Episode plans (which images) and their materialisation (pixels), in one process, no Ray.

* :meth:`EpisodeBuilder.plan` turns a global episode number ``g`` into an :class:`EpisodeSpec`:
  the source, classes, and the keys of the support and query images with their episode labels.
  It is a pure function of ``(seed, split, source list, g)`` (see :mod:`smat_dist.data.sampler`).
* :meth:`EpisodeBuilder.materialise` reads, decodes and transforms the images of a spec into a
  :class:`RawEpisode` (uint8 arrays). Training augmentation draws from the episode's own seed.
* An :class:`EpisodeSpec` is also one line of a frozen evaluation list (:func:`save_episode_list`,
  :func:`load_episode_list`), so frozen episodes and on-the-fly episodes share one code path.

A corrupt sample (bad image bytes, a tar member that does not match the index, a wrong class
label) is logged once with its shard and key, counted in :meth:`EpisodeBuilder.stats`, and
replaced by another image of the same class that is not yet in the episode, chosen from a
permutation seeded by the episode and class, so a class never ends up short of its shots.

For a URL root, ``build(g, warm=[...])`` / ``materialise(spec, warm=[...])`` first hand the shards
of the listed upcoming episodes to a background :class:`~smat_dist.data.cache.Prefetcher`
(``cfg.prefetch_shards`` at most in flight), so their first-touch download overlaps this build.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from smat_dist.data.config import DataConfig
from smat_dist.data.sampler import (PURPOSE_AUGMENT, PURPOSE_EPISODE, PURPOSE_IMAGES, PURPOSE_REPLACE,
                                    EpisodeSampler, MultiSourceSampler, episode_rng, select_rows, stream_tag)
from smat_dist.data.cache import Prefetcher, Ref
from smat_dist.data.store import Catalog, CorruptSample, DataError, FilePool, SplitIndex, resolve_sources
from smat_dist.data.tario import parse_key
from smat_dist.data.transforms import DecodeError, EpisodeTransform, to_tensor

if TYPE_CHECKING:  # torch is imported by consumers only: actors ship numpy
    from smat_dist.episode import Episode

log = logging.getLogger(__name__)

EPISODE_FORMAT = "smat-dist-episode-v1"
COUNTERS = ("episodes", "images", "bytes_read", "skipped_corrupt", "skipped_decode", "skipped_member",
            "skipped_label", "skipped_truncated", "replaced", "build_seconds",
            # URL roots: the shard cache of this builder's process, and its prefetches
            "cache_downloads", "cache_bytes_downloaded", "cache_evictions", "cache_retries",
            "cache_download_seconds", "prefetch_requested")
PLAN_MEMO = 64  # planned-ahead episodes (for prefetch) kept until they are built


@dataclass
class EpisodeSpec:
    """Which images make episode ``index`` (one JSONL line of a frozen list)."""

    source: str
    split: str
    index: int
    seed: int
    stream: int  # stream tag of the (split, source list) the episode was drawn from
    classes: List[int]  # absolute class id of each episode label
    support: List[Tuple[str, int]]  # (key, label)
    query: List[Tuple[str, int]]

    @property
    def ways(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        shots = [0] * len(self.classes)
        for _, lab in self.support:
            shots[lab] += 1
        return {
            "format": EPISODE_FORMAT, "source": self.source, "split": self.split, "index": self.index,
            "seed": self.seed, "stream": self.stream, "ways": self.ways, "classes": list(self.classes),
            "shots": shots, "queries": len(self.query) // max(1, self.ways),
            "support": [{"key": k, "label": int(l)} for k, l in self.support],
            "query": [{"key": k, "label": int(l)} for k, l in self.query],
        }

    @classmethod
    def from_json(cls, d: dict, origin: str = "<json>") -> "EpisodeSpec":
        try:
            if d.get("format", EPISODE_FORMAT) != EPISODE_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            return cls(str(d["source"]), str(d["split"]), int(d["index"]), int(d["seed"]), int(d.get("stream", 0)),
                       [int(c) for c in d["classes"]],
                       [(str(e["key"]), int(e["label"])) for e in d["support"]],
                       [(str(e["key"]), int(e["label"])) for e in d["query"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{origin}: not an episode record: {exc!r}") from exc


def save_episode_list(specs: Iterable[EpisodeSpec], path: str | Path) -> int:
    n = 0
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps(s.to_json(), separators=(",", ":")) + "\n")
            n += 1
    return n


def load_episode_list(path: str | Path) -> List[EpisodeSpec]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"episode list not found: {p}")
    out = []
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{i}: not JSON: {exc}") from exc
                out.append(EpisodeSpec.from_json(d, f"{p}:{i}"))
    return out


@dataclass
class RawEpisode:
    """Pixels as uint8 NHWC (what actors ship); :meth:`to_episode` normalises on the consumer."""

    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray
    index: int
    source: str
    split: str
    classes: Tuple[int, ...]
    support_keys: List[str] = field(default_factory=list)  # after any replacement
    query_keys: List[str] = field(default_factory=list)
    stats: Dict[str, float] = field(default_factory=dict)  # counter increments of this episode

    def to_episode(self, mean: Sequence[float], std: Sequence[float], device=None) -> "Episode":
        """Tensors on ``device`` (pixels normalised there, see :func:`to_tensor`)."""
        import torch

        from smat_dist.episode import Episode, to_device  # torch: the data plane itself stays torch-free

        def labels(ys):
            return to_device(torch.from_numpy(np.array(ys, dtype=np.int64)), device or "cpu")

        return Episode(
            support_x=to_tensor(self.support, mean, std, device),
            support_y=labels(self.support_y),
            query_x=to_tensor(self.query, mean, std, device),
            query_y=labels(self.query_y),
            index=int(self.index), source=self.source, classes=tuple(int(c) for c in self.classes),
        )


def spec_row(spec: EpisodeSpec, idx: SplitIndex, key: str, label: int) -> int:
    """The index row of an episode member, checked against the label the episode gives it."""
    try:
        row = idx.row_of_key(key)
    except KeyError as exc:
        raise DataError(f"episode {spec.index} of {spec.source}/{spec.split}: {exc}") from None
    c = idx.class_of(row)
    if not 0 <= label < spec.ways or spec.classes[label] != c:
        raise DataError(f"episode {spec.index} of {spec.source}/{spec.split}: key {key} is class {c}, label "
                        f"{label} says {spec.classes[label] if 0 <= label < spec.ways else '?'}")
    return row


class EpisodeBuilder:
    """Plans and materialises episodes of one (split, source list) stream; owns its file handles."""

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0,
                 sources: Optional[Sequence[str]] = None, augment: Optional[bool] = None):
        cfg.validate()
        self.cfg = cfg
        self.split = split
        self.seed = int(seed)
        self.catalog = Catalog.for_config(cfg)
        self.sources, self.weights = resolve_sources(cfg, self.catalog, split, sources)
        self.tag = stream_tag(split, self.sources)
        for s in self.sources:  # fail fast, naming the file, on a missing/mismatched index or shard
            self.catalog.store(s).index(split)
        self.augment = (split == "train" and cfg.augment) if augment is None else bool(augment)
        self.train_tf = EpisodeTransform(cfg.image_size, cfg.transform, train=True)
        self.eval_tf = EpisodeTransform(cfg.image_size, cfg.transform, train=False)
        self.files = FilePool(cfg.max_open_files)
        self._sampler: Optional[MultiSourceSampler] = None
        self._bad: Dict[Tuple[str, str, int], str] = {}  # (source, split, row) -> reason, logged once
        self.counters: Dict[str, float] = {k: 0 for k in COUNTERS}
        # background downloads for URL roots, started by the first prefetch() (a builder that never
        # prefetches, e.g. the loader's driver-side one or evaluation's, starts no thread)
        self._prefetch_limit = cfg.prefetch_shards if self.catalog.remote else 0
        self._prefetch: Optional[Prefetcher] = None
        self._planned: Dict[int, EpisodeSpec] = {}

    # -- planning -----------------------------------------------------------------

    @property
    def sampler(self) -> MultiSourceSampler:
        if self._sampler is None:
            samplers = {s: EpisodeSampler(self.catalog.store(s).spec, self.split, self.cfg.episode) for s in self.sources}
            self._sampler = MultiSourceSampler(samplers, self.sources, self.weights)
        return self._sampler

    def plan(self, g: int) -> EpisodeSpec:
        memo = self._planned.pop(int(g), None)
        if memo is not None:
            return memo
        desc = self.sampler.sample(episode_rng(self.seed, self.tag, g, PURPOSE_EPISODE))
        idx = self.catalog.store(desc.source).index(self.split)
        support, query = select_rows(desc, idx.class_rows(), episode_rng(self.seed, self.tag, g, PURPOSE_IMAGES))
        s = [(idx.key(int(r)), lab) for lab, rows in enumerate(support) for r in rows]
        q = [(idx.key(int(r)), lab) for lab, rows in enumerate(query) for r in rows]
        return EpisodeSpec(desc.source, self.split, int(g), self.seed, self.tag, list(desc.classes), s, q)

    def build(self, g: int, warm: Sequence[Union[int, EpisodeSpec]] = ()) -> RawEpisode:
        return self.materialise(self.plan(g), augment=self.augment, warm=warm)

    # -- prefetch (URL roots) ---------------------------------------------------------------

    def shard_refs(self, spec: EpisodeSpec) -> List[Ref]:
        """The remote shards ``spec`` reads, in first-use order (empty for a local root)."""
        if not self.catalog.remote:
            return []
        store = self.catalog.store(spec.source)
        idx = store.index(spec.split)
        refs = store.shard_refs(spec.split)
        seen: Dict[int, None] = {}
        for key, _ in spec.support + spec.query:
            try:
                seen.setdefault(int(idx.shard[idx.sample_of(idx.row_of_key(key))[0]]), None)
            except KeyError:
                continue  # materialise reports it
        return [refs[i] for i in seen]

    def prefetch(self, upcoming: Sequence[Union[int, EpisodeSpec]]) -> int:
        """Ask the background prefetcher for the shards of ``upcoming`` episodes (numbers to be
        built by this builder, or frozen specs); returns how many downloads were queued."""
        if self._prefetch_limit <= 0 or not upcoming:
            return 0
        if self._prefetch is None:
            self._prefetch = Prefetcher(self.catalog.cache, self._prefetch_limit)
        queued = 0
        for job in upcoming:
            if isinstance(job, EpisodeSpec):
                spec = job
            else:
                g = int(job)
                spec = self._planned.get(g)
                if spec is None:
                    spec = self.plan(g)
                    if len(self._planned) >= PLAN_MEMO:
                        self._planned.pop(next(iter(self._planned)))
                    self._planned[g] = spec
            queued += self._prefetch.want(self.shard_refs(spec))
            if self._prefetch.pending >= self._prefetch.limit:
                break
        self.counters["prefetch_requested"] += queued
        return queued

    # -- pixels ---------------------------------------------------------------------

    def materialise(self, spec: EpisodeSpec, augment: bool = False,
                    warm: Sequence[Union[int, EpisodeSpec]] = ()) -> RawEpisode:
        t0 = time.perf_counter()
        before = dict(self.counters)
        self.prefetch(warm)
        store = self.catalog.store(spec.source)
        idx = store.index(spec.split)
        items = spec.support + spec.query
        rows = []
        for key, lab in items:
            rows.append(spec_row(spec, idx, key, lab))
        tf = self.train_tf if augment else self.eval_tf
        params = tf.params(episode_rng(spec.seed, spec.stream, spec.index, PURPOSE_AUGMENT), len(items)) \
            if augment else None
        used = set(rows)
        replacements: Dict[int, Iterator[int]] = {}
        out = np.empty((len(items), tf.size, tf.size, 3), dtype=np.uint8)
        keys: List[str] = []
        for p, row in enumerate(rows):
            while True:
                try:
                    pix, key = self._load(store, spec.split, row, tf, None if params is None else params[p])
                    break
                except (CorruptSample, DecodeError) as exc:
                    c = idx.class_of(row)
                    if c not in replacements:
                        replacements[c] = self._candidates(spec, idx, c)
                    row = next((r for r in replacements[c] if r not in used and (spec.source, spec.split, r) not in self._bad),
                               None)
                    if row is None:
                        raise DataError(f"{spec.source}/{spec.split}: class {c} has no usable image left for "
                                        f"episode {spec.index} (last error: {exc})") from None
                    used.add(row)
                    self.counters["replaced"] += 1
            out[p] = pix
            keys.append(key)
        ns = len(spec.support)
        labels = np.asarray([lab for _, lab in items], dtype=np.int64)
        self.counters["episodes"] += 1
        self.counters["images"] += len(items)
        self.counters["build_seconds"] += time.perf_counter() - t0
        self._sync_cache_counters()
        delta = {k: self.counters[k] - before.get(k, 0) for k in self.counters}
        return RawEpisode(out[:ns], labels[:ns], out[ns:], labels[ns:], spec.index, spec.source, spec.split,
                          tuple(spec.classes), keys[:ns], keys[ns:], delta)

    def _candidates(self, spec: EpisodeSpec, idx, c: int) -> Iterator[int]:
        start, stop = idx.rows(c)
        rng = episode_rng(spec.seed, spec.stream, spec.index, PURPOSE_REPLACE, c)
        return iter((start + rng.permutation(stop - start)).tolist())

    def _load(self, store, split: str, row: int, tf: EpisodeTransform, u) -> Tuple[np.ndarray, str]:
        bad = self._bad.get((store.name, split, row))
        idx = store.index(split)
        if bad is not None:  # known bad: skip without re-reading (same outcome, less I/O)
            self._count_skip(bad)
            raise CorruptSample(bad, "", idx.key(row), "known bad")
        try:
            data, _ext, key = store.read(split, row, self.files)
            self.counters["bytes_read"] += len(data) if isinstance(data, bytes) else data.nbytes
            return tf(data, u), key
        except CorruptSample as exc:
            self._mark_bad(store.name, split, row, exc.reason, exc.shard, exc.key, exc.detail)
            raise
        except DecodeError as exc:
            path = idx.locate(row)[0]
            self._mark_bad(store.name, split, row, "decode", path, idx.key(row), str(exc))
            raise

    def _mark_bad(self, source: str, split: str, row: int, reason: str, shard: str, key: str, detail: str) -> None:
        self._count_skip(reason)
        if len(self._bad) < 100_000:
            self._bad[(source, split, row)] = reason
        log.warning("skipped corrupt sample (%s) shard=%s key=%s %s", reason, shard, key, detail)

    def _count_skip(self, reason: str) -> None:
        self.counters["skipped_corrupt"] += 1
        self.counters[f"skipped_{reason}"] = self.counters.get(f"skipped_{reason}", 0) + 1

    def _sync_cache_counters(self) -> None:
        if self.catalog.remote and self.catalog._cache is not None:
            self.counters.update(self.catalog.cache.stats())

    def stats(self) -> Dict[str, float]:
        self._sync_cache_counters()
        out = dict(self.counters)
        out["open_files"] = self.files.open_count
        out["file_opens"] = self.files.opens
        return out

    def close(self) -> None:
        self.files.close()
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None


__all__ = ["COUNTERS", "EpisodeBuilder", "EpisodeSpec", "RawEpisode", "load_episode_list", "resolve_sources",
           "save_episode_list", "EPISODE_FORMAT", "parse_key"]
