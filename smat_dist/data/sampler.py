"""Meta-Dataset episode sampler, pure NumPy (docs/data.md#episodes-determinism-delivery).

Everything random is drawn from a ``numpy.random.Generator`` handed in by the caller, and the
caller derives that generator from ``(seed, source set, split, g)`` with :func:`episode_seed`.
So episode ``g`` is the same whichever process, actor or node builds it, and a run resumes by
asking for later ``g``.

Per episode (MD order): classes (flat, ImageNet DAG node, or Omniglot alphabet), then the
balanced query count q, then the support-set size |S|, then the per-class shots k_c.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from smat_dist.data.config import EpisodeConfig
from smat_dist.data.spec import BILEVEL, HIERARCHICAL, SourceSpec, spanning_leaves

# Smallest bound for which every ImageNet leaf is reachable through some eligible node (MD).
MAX_SPANNING_LEAVES_ELIGIBLE = 392

# Purposes of the per-episode seed streams (never renumber: it would change every episode).
PURPOSE_EPISODE, PURPOSE_IMAGES, PURPOSE_AUGMENT, PURPOSE_REPLACE = 0, 1, 2, 3


class SamplerError(ValueError):
    """The episode protocol cannot be run on this spec/split with these settings."""


@dataclass(frozen=True)
class EpisodeDescription:
    """Classes (absolute ids, in label order), shots per class and the shared query count."""

    source: str
    classes: Tuple[int, ...]
    shots: Tuple[int, ...]
    query: int

    @property
    def ways(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------- seeds


def stream_tag(split: str, sources: Sequence[str]) -> int:
    """A stable 32-bit id of (split, ordered source list): part of every episode's seed."""
    text = split + "|" + ",".join(sources)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def episode_seed(seed: int, tag: int, g: int, purpose: int, *extra: int) -> np.random.SeedSequence:
    """Seed stream ``purpose`` of global episode ``g`` (independent of who builds it)."""
    if g < 0:
        raise ValueError(f"episode index must be >= 0, got {g}")
    return np.random.SeedSequence(int(seed), spawn_key=(int(tag), int(g), int(purpose), *map(int, extra)))


def episode_rng(seed: int, tag: int, g: int, purpose: int, *extra: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(episode_seed(seed, tag, g, purpose, *extra)))


# ---------------------------------------------------------------- the MD formulas


def compute_num_query(images_per_class: np.ndarray, max_num_query: int,
                      num_support: Optional[int | Tuple[int, int]]) -> int:
    """q = min(max_num_query, min_c floor(n_c/2)) in VWVS; min(max, min_c n_c - K) with fixed K."""
    n_min = int(np.min(images_per_class))
    if num_support is None:
        if n_min < 2:
            raise SamplerError(f"a class has {n_min} image(s); variable shots need >= 2 per class")
        max_q = n_min // 2
    else:
        k = num_support[1] if isinstance(num_support, tuple) else int(num_support)
        max_q = n_min - k
    if max_q < 1:
        raise SamplerError(f"no image left for the query set: smallest class has {n_min}, shots {num_support}")
    return int(min(max_num_query, max_q))


def support_set_size(beta: float, num_remaining_per_class: np.ndarray, contrib_cap: int,
                     max_support_set_size: int) -> int:
    """|S| = min(max_support, sum_c floor(beta * min(cap, r_c) + 1)), beta ~ U[0, 1)."""
    ways = len(num_remaining_per_class)
    if max_support_set_size < ways:
        raise SamplerError(f"max_support_set_size {max_support_set_size} < number of ways {ways}")
    contrib = np.minimum(contrib_cap, num_remaining_per_class)
    return int(min(np.floor(beta * contrib + 1).sum(), max_support_set_size))


def shots_per_class(log_weights: np.ndarray, images_per_class: np.ndarray,
                    num_remaining_per_class: np.ndarray, support_size: int) -> np.ndarray:
    """k_c = min(floor(p_c (|S| - N)) + 1, r_c) with p_c proportional to n_c * exp(u_c)."""
    ways = len(images_per_class)
    if support_size < ways:
        raise SamplerError(f"support size {support_size} < number of ways {ways}")
    weights = np.exp(log_weights) * images_per_class
    p = weights / weights.sum()
    k = np.floor(p * (support_size - ways)).astype(np.int64) + 1
    return np.minimum(k, num_remaining_per_class).astype(np.int64)


# ---------------------------------------------------------------- one source, one split


class EpisodeSampler:
    """Episode descriptions for one (source, split), MD semantics."""

    def __init__(self, spec: SourceSpec, split: str, cfg: EpisodeConfig):
        self.spec, self.split, self.cfg = spec, split, cfg
        counts = spec.images_per_class
        self.classes = [c for c in spec.classes(split) if counts[c] >= cfg.min_examples_in_class]
        if not self.classes:
            raise SamplerError(f"{spec.name}/{split}: no classes (after min_examples_in_class={cfg.min_examples_in_class})")
        self.counts = {c: int(counts[c]) for c in self.classes}
        self.fixed_support: Optional[int | Tuple[int, int]] = None
        if cfg.num_support_range is not None:
            self.fixed_support = (int(cfg.num_support_range[0]), int(cfg.num_support_range[1]))
        elif cfg.num_support is not None:
            self.fixed_support = int(cfg.num_support)
        if cfg.num_ways is not None and cfg.num_ways > len(self.classes):
            raise SamplerError(f"{spec.name}/{split}: num_ways {cfg.num_ways} > {len(self.classes)} classes")
        if cfg.num_ways is None and len(self.classes) < cfg.min_ways:
            raise SamplerError(f"{spec.name}/{split}: {len(self.classes)} classes < min_ways {cfg.min_ways}")
        hierarchies_on = cfg.num_ways is None
        self.use_dag = hierarchies_on and spec.kind == HIERARCHICAL and not cfg.ignore_dag_ontology
        self.use_bilevel = hierarchies_on and spec.kind == BILEVEL and not cfg.ignore_bilevel_ontology
        self.dag_nodes: List[Tuple[str, np.ndarray]] = []
        self.alphabets: List[np.ndarray] = []
        if self.use_dag:
            self._init_dag()
        if self.use_bilevel:
            self._init_bilevel()

    def _init_dag(self) -> None:
        """Eligible nodes span min_ways..392 kept leaves; nodes and leaves in wn_id order (MD's)."""
        wn_to_class = {w: c for c, w in self.spec.class_names.items()}
        keep = set(self.classes)
        for wn, leaves in sorted(spanning_leaves(self.spec.graph[self.split]).items()):
            ids = [wn_to_class[lf] for lf in sorted(leaves) if wn_to_class.get(lf) in keep]
            if self.cfg.min_ways <= len(ids) <= MAX_SPANNING_LEAVES_ELIGIBLE:
                self.dag_nodes.append((wn, np.asarray(ids, dtype=np.int64)))
        if not self.dag_nodes:
            raise SamplerError(f"{self.spec.name}/{self.split}: no DAG node spans >= {self.cfg.min_ways} leaves")

    def _init_bilevel(self) -> None:
        if self.cfg.min_examples_in_class > 0:
            raise SamplerError("alphabet (bi-level) sampling does not support min_examples_in_class > 0")
        for ids in self.spec.superclasses.get(self.split, []):
            if len(ids) < self.cfg.min_ways:
                raise SamplerError(
                    f"{self.spec.name}/{self.split}: a superclass has {len(ids)} classes < min_ways {self.cfg.min_ways}"
                )
            self.alphabets.append(np.asarray(ids, dtype=np.int64))

    # -- class choice ----------------------------------------------------------

    def sample_classes(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        hierarchical = self.use_dag or self.use_bilevel
        if hierarchical and cfg.ignore_hierarchy_probability > 0:
            if rng.uniform() < cfg.ignore_hierarchy_probability:
                hierarchical = False
        if hierarchical and self.use_dag:
            _, ids = self.dag_nodes[int(rng.integers(len(self.dag_nodes)))]
            if len(ids) > cfg.max_ways_upper_bound:
                ids = rng.choice(ids, size=cfg.max_ways_upper_bound, replace=False)
            return np.asarray(ids, dtype=np.int64)
        if hierarchical and self.use_bilevel:
            alphabet = self.alphabets[int(rng.integers(len(self.alphabets)))]
            ways = int(rng.integers(cfg.min_ways, min(cfg.max_ways_upper_bound, len(alphabet)) + 1))
            return rng.choice(alphabet, size=ways, replace=False).astype(np.int64)
        pool = np.asarray(self.classes, dtype=np.int64)
        if cfg.num_ways is not None:
            ways = cfg.num_ways
        else:
            ways = int(rng.integers(cfg.min_ways, min(cfg.max_ways_upper_bound, len(pool)) + 1))
        return rng.choice(pool, size=ways, replace=False).astype(np.int64)

    # -- the whole description ---------------------------------------------------

    def sample(self, rng: np.random.Generator) -> EpisodeDescription:
        cfg = self.cfg
        classes = self.sample_classes(rng)
        n = np.asarray([self.counts[int(c)] for c in classes], dtype=np.int64)
        if cfg.num_query is not None:
            q = int(cfg.num_query)
        else:
            q = compute_num_query(n, cfg.max_num_query, self.fixed_support)
        remaining = n - q
        if self.fixed_support is None:
            size = support_set_size(float(rng.uniform()), remaining, cfg.max_support_size_contrib_per_class,
                                    cfg.max_support_set_size)
            logw = rng.uniform(cfg.min_log_weight, cfg.max_log_weight, size=len(classes))
            shots = shots_per_class(logw, n, remaining, size)
        else:
            if isinstance(self.fixed_support, tuple):
                k = int(rng.integers(self.fixed_support[0], self.fixed_support[1] + 1))
            else:
                k = self.fixed_support
            shots = np.full(len(classes), k, dtype=np.int64)
        if np.any(shots + q > n) or np.any(shots < 1):
            bad = int(np.argmax((shots + q > n) | (shots < 1)))
            raise SamplerError(
                f"{self.spec.name}/{self.split}: class {int(classes[bad])} has {int(n[bad])} images, "
                f"episode asks for {int(shots[bad])} shots + {q} queries (set min_examples_in_class)"
            )
        return EpisodeDescription(self.spec.name, tuple(int(c) for c in classes),
                                  tuple(int(k) for k in shots), int(q))


class MultiSourceSampler:
    """Picks a source per episode (uniform, or by weight), then runs that source's sampler."""

    def __init__(self, samplers: Dict[str, EpisodeSampler], order: Sequence[str],
                 weights: Optional[Sequence[float]] = None):
        self.order = list(order)
        self.samplers = samplers
        if weights is None:
            self.p = None
        else:
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != len(self.order) or np.any(w < 0) or w.sum() <= 0:
                raise SamplerError(f"bad source weights {list(weights)} for sources {self.order}")
            self.p = w / w.sum()

    def sample(self, rng: np.random.Generator) -> EpisodeDescription:
        if len(self.order) == 1:
            i = 0
        elif self.p is None:
            i = int(rng.integers(len(self.order)))
        else:
            i = int(rng.choice(len(self.order), p=self.p))
        return self.samplers[self.order[i]].sample(rng)


def select_rows(desc: EpisodeDescription, class_rows: Dict[int, Tuple[int, int]],
                rng: np.random.Generator) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """'independent' mode: k_c + q distinct rows of each class; first k_c support, then q query."""
    support, query = [], []
    for c, k in zip(desc.classes, desc.shots):
        start, stop = class_rows[c]
        n = stop - start
        need = k + desc.query
        if need > n:
            raise SamplerError(f"{desc.source}: class {c} holds {n} images, episode needs {need}")
        picked = start + rng.choice(n, size=need, replace=False).astype(np.int64)
        support.append(picked[:k])
        query.append(picked[k:])
    return support, query


__all__ = [
    "EpisodeDescription", "EpisodeSampler", "MultiSourceSampler", "SamplerError",
    "MAX_SPANNING_LEAVES_ELIGIBLE", "compute_num_query", "support_set_size", "shots_per_class",
    "episode_seed", "episode_rng", "stream_tag", "select_rows",
    "PURPOSE_EPISODE", "PURPOSE_IMAGES", "PURPOSE_AUGMENT", "PURPOSE_REPLACE",
]

