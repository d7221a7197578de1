"""Frozen evaluation episode lists and a caching episode reader.

* :func:`frozen_list` returns the episode list of one (source, split): generated once with the data
  plane's sampler (a pure function of seed, split, source and episode number, identical to
  ``smat-data episodes --source S --split test -n N --seed SEED``), cached as JSONL under
  ``<episodes_dir>/<split>/<source>-n<N>-seed<SEED>[-start<S>][-ep<hash>].jsonl`` and re-read on
  later runs, so every method is scored on the same tasks. Its sha256 goes into the results.
* :class:`EpisodeReader` materialises specs with the deterministic eval transform and keeps the
  decoded images in a byte-bounded LRU: 600 episodes of a source draw their images from the same
  test classes again and again (the synthetic benchmark's 600×7 episodes touch 4.7k distinct images
  about 200 times each), so decoding once is an exact speed-up. A corrupt sample falls back to the
  data plane's own materialisation, which replaces it exactly as in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from smat_dist.data.builder import EpisodeBuilder, EpisodeSpec, load_episode_list, spec_row
from smat_dist.data.config import DataConfig, EpisodeConfig
from smat_dist.data.location import is_url
from smat_dist.data.store import Catalog, CorruptSample, DataError, FilePool
from smat_dist.data.transforms import DecodeError, EpisodeTransform, to_tensor
from smat_dist.episode import Episode
from smat_dist.fsutil import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class FrozenList:
    source: str
    split: str
    path: Path
    sha256: str
    specs: List[EpisodeSpec]


def episode_config_tag(cfg: EpisodeConfig) -> str:
    """'' for the Meta-Dataset defaults, else a short hash: lists of other protocols never collide."""
    mine = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if mine == json.dumps(dataclasses.asdict(EpisodeConfig()), sort_keys=True):
        return ""
    return "-ep" + hashlib.sha256(mine.encode()).hexdigest()[:8]


def list_path(directory: str | Path, source: str, split: str, n: int, seed: int, start: int = 0,
              episode_cfg: Optional[EpisodeConfig] = None) -> Path:
    tag = episode_config_tag(episode_cfg or EpisodeConfig())
    start_tag = f"-start{start}" if start else ""
    return Path(directory) / split / f"{source}-n{n}-seed{seed}{start_tag}{tag}.jsonl"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(specs: List[EpisodeSpec], path: Path, source: str, split: str, n: int, seed: int, start: int) -> None:
    if len(specs) != n:
        raise DataError(f"{path}: holds {len(specs)} episodes, expected {n}; delete it to regenerate")
    for i, s in enumerate(specs):
        if (s.source, s.split, s.seed, s.index) != (source, split, seed, start + i):
            raise DataError(
                f"{path}:{i + 1}: episode ({s.source}, {s.split}, seed {s.seed}, index {s.index}) where "
                f"({source}, {split}, seed {seed}, index {start + i}) was expected; delete it to regenerate")


def frozen_list(data_cfg: DataConfig, source: str, split: str, n: int, seed: int, directory: str | Path,
                start: int = 0) -> FrozenList:
    """The cached list of episodes ``start .. start+n-1`` of (source, split), generated if absent."""
    path = list_path(directory, source, split, n, seed, start, data_cfg.episode)
    if not path.exists():
        builder = EpisodeBuilder(data_cfg, split, seed, [source])
        try:
            specs = [builder.plan(g) for g in range(start, start + n)]
        finally:
            builder.close()
        # Atomic: concurrent evaluations (Pre, PMF, SMAT in parallel) never see half a list.
        atomic_write_text(path, "".join(json.dumps(s.to_json(), separators=(",", ":")) + "\n" for s in specs))
        log.info("wrote %d %s/%s episodes to %s", n, source, split, path)
    specs = load_episode_list(path)
    _check(specs, path, source, split, n, seed, start)
    return FrozenList(source, split, path, sha256_file(path), specs)


def writable_episodes_dir(preferred: Optional[str], data_root: str, fallback: Path) -> Path:
    """``preferred`` (must be writable) or ``<data_root>/episodes``, else ``fallback`` with a warning."""
    if preferred:
        p = Path(preferred)
        p.mkdir(parents=True, exist_ok=True)
        return p

    if is_url(data_root):  # a URL root is read-only here: lists go next to the results
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback
    p = Path(data_root) / "episodes"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return p
    except OSError:
        log.warning("cannot write episode lists under %s; using %s (pass --episodes-dir)", p, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


class EpisodeReader:
    """Specs -> :class:`Episode` tensors (eval transform), with a decoded-image cache.

    The cache is one dict per (source, split) keyed by the image key, bounded by ``cache_mb``
    (oldest half dropped when full): a hit costs one dict lookup, so an episode of 300 images is
    assembled with a list comprehension and one ``np.stack``, no per-image function calls.
    """

    def __init__(self, cfg: DataConfig, cache_mb: int = 1024):
        self.cfg = cfg
        self.catalog = Catalog.for_config(cfg)
        self.tf = EpisodeTransform(cfg.image_size, cfg.transform, train=False)
        self.files = FilePool(cfg.max_open_files)
        self.budget = int(cache_mb) << 20
        self.bytes = 0
        self._cache: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
        self._builders: Dict[Tuple[str, str, int], EpisodeBuilder] = {}
        self.hits = self.misses = self.fallbacks = 0

    def _load(self, spec: EpisodeSpec, key: str, label: int) -> np.ndarray:
        store = self.catalog.store(spec.source)
        row = spec_row(spec, store.index(spec.split), key, label)
        data, _ext, _key = store.read(spec.split, row, self.files)
        return self.tf(data, None)

    def _remember(self, cache: Dict[str, np.ndarray], key: str, img: np.ndarray) -> None:
        if self.budget <= 0:
            return
        if self.bytes + img.nbytes > self.budget:  # drop the oldest half of every source's entries
            for d in self._cache.values():
                for k in list(d)[: len(d) // 2 + 1]:
                    self.bytes -= d.pop(k).nbytes
        cache[key] = img
        self.bytes += img.nbytes

    def _fallback(self, spec: EpisodeSpec) -> Episode:
        """The data plane's materialisation (corrupt samples replaced as everywhere else)."""
        self.fallbacks += 1
        k = (spec.source, spec.split, spec.seed)
        if k not in self._builders:
            self._builders[k] = EpisodeBuilder(self.cfg, spec.split, spec.seed, [spec.source])
        t = self.cfg.transform
        return self._builders[k].materialise(spec, augment=False).to_episode(t.mean, t.std)

    def episode(self, spec: EpisodeSpec) -> Episode:
        import torch

        items = spec.support + spec.query
        cache = self._cache.setdefault((spec.source, spec.split), {})
        imgs = [cache.get(k) for k, _ in items]
        try:
            for i, img in enumerate(imgs):
                if img is None:
                    key, lab = items[i]
                    img = cache.get(key)  # the same image twice in one episode
                    if img is None:
                        img = self._load(spec, key, lab)
                        self._remember(cache, key, img)
                        self.misses += 1
                    imgs[i] = img
        except (CorruptSample, DecodeError) as exc:
            log.warning("episode %d of %s/%s: %s; materialising it through the data plane",
                        spec.index, spec.source, spec.split, exc)
            return self._fallback(spec)
        self.hits += len(items)
        x = to_tensor(np.stack(imgs), self.cfg.transform.mean, self.cfg.transform.std)
        y = torch.tensor([lab for _, lab in items], dtype=torch.int64)
        ns = len(spec.support)
        return Episode(support_x=x[:ns], support_y=y[:ns], query_x=x[ns:], query_y=y[ns:], index=spec.index,
                       source=spec.source, classes=tuple(spec.classes))

    def class_images(self, source: str, split: str, class_id: int) -> Tuple[List[str], Optional[np.ndarray]]:
        """Every readable image of one class, in row order (the canonical order feature blocks use).
        Unreadable images are left out (and logged); an episode that needs one takes the
        per-episode path, where the data plane replaces it."""
        store = self.catalog.store(source)
        idx = store.index(split)
        start, stop = idx.rows(class_id)
        cache = self._cache.setdefault((source, split), {})
        keys, imgs = [], []
        for row in range(start, stop):
            key = idx.key(row)
            img = cache.get(key)
            if img is None:
                try:
                    data, _ext, _key = store.read(split, row, self.files)
                    img = self.tf(data, None)
                except (CorruptSample, DecodeError) as exc:
                    log.warning("%s/%s class %d: skipping unreadable %s: %s", source, split, class_id, key, exc)
                    continue
                self._remember(cache, key, img)
                self.misses += 1
            keys.append(key)
            imgs.append(img)
        return keys, (np.stack(imgs) if imgs else None)

    def stats(self) -> Dict[str, float]:
        return {"images": self.hits, "decoded": self.misses, "cache_mb": self.bytes / 2**20,
                "fallbacks": self.fallbacks}

    def close(self) -> None:
        self.files.close()
        for b in self._builders.values():
            b.close()
        self._builders.clear()


__all__ = ["EpisodeReader", "FrozenList", "episode_config_tag", "frozen_list", "list_path", "sha256_file",
           "writable_episodes_dir"]
