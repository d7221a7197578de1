"""Typed settings of the data plane (the single source of its defaults).

``DataConfig`` is embedded as the ``data:`` section of the run configuration. Episode constants
are Meta-Dataset's (``data_config_common.gin``; identical in PMF and SMAT), preprocessing is
SMAT/PMF's (:mod:`smat_dist.data.transforms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from smat_dist.data.location import DataRoot, RootError
from smat_dist.errors import ConfigError


def _error(msg: str) -> Exception:
    return ConfigError(msg)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class EpisodeConfig:
    """Meta-Dataset episode protocol. ``None`` in the fixed-mode fields means variable (VWVS)."""

    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    # Caps each class's contribution to the support-size draw, not its shots.
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    min_examples_in_class: int = 0  # classes with fewer images are never sampled
    ignore_dag_ontology: bool = False  # True: ImageNet-like sources sample classes flatly
    ignore_bilevel_ontology: bool = False  # True: Omniglot-like sources ignore alphabets
    ignore_hierarchy_probability: float = 0.0  # share of episodes that bypass the hierarchy
    num_ways: Optional[int] = None  # fixed N (hierarchies are then bypassed, as in MD)
    num_support: Optional[int] = None  # fixed K shots per class
    # [lo, hi]: K drawn uniformly per episode (balanced); overrides num_support when set.
    num_support_range: Optional[List[int]] = None
    num_query: Optional[int] = None  # fixed q per class
    # "independent": every episode draws its images afresh (stateless, world-size invariant;
    # PMF/SMAT behaviour). MD's stateful per-class cursor mode is not offered, see README.
    image_selection: str = "independent"

    def validate(self) -> None:
        if self.min_ways < 1 or self.max_ways_upper_bound < self.min_ways:
            raise _error(
                f"episode: need 1 <= min_ways <= max_ways_upper_bound, got "
                f"{self.min_ways}, {self.max_ways_upper_bound}"
            )
        if self.image_selection != "independent":
            raise _error(f"episode.image_selection: only 'independent' is supported, got {self.image_selection!r}")
        if self.num_support_range is not None:
            r = list(self.num_support_range)
            if len(r) != 2 or r[0] < 1 or r[1] < r[0]:
                raise _error(f"episode.num_support_range must be [lo, hi] with 1 <= lo <= hi, got {r}")
        for name in ("num_ways", "num_support", "num_query"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise _error(f"episode.{name} must be >= 1 or null, got {v}")
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise _error("episode.ignore_hierarchy_probability must be in [0, 1]")
        if self.min_log_weight > self.max_log_weight:
            raise _error("episode.min_log_weight must be <= max_log_weight")


@dataclass
class AugmentConfig:
    """Pixel pipeline. Training: RandomResizedCrop + ImageJitter + flip; eval: resize + centre crop."""

    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    crop_ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    brightness: float = 0.4  # ImageJitter (PMF): factor 1 + a*(2u-1) per enhancement
    contrast: float = 0.4
    color: float = 0.4
    hflip: float = 0.5
    # Eval resize of the shorter side = int(image_size * eval_resize_ratio) (128 -> 146).
    eval_resize_ratio: float = 256.0 / 224.0
    # JPEG draft-mode decoding (libjpeg DCT scaling) when the stored image is >= 2x the needed
    # size. Faster, but pixels differ slightly from a full decode; off for fidelity.
    jpeg_draft: bool = False


REDIRECT_RULES = ("same_host", "none", "any")


@dataclass
class RemoteConfig:
    """How remote roots are read: deadlines, retries, redirects and ``pipe:`` commands (``data.remote``;
    docs/data.md#remote-reads-deadlines-retries-redirects). Every remote read of the data plane
    (manifests, indexes, shards into the cache, streamed shards) goes through these limits."""

    # Until the server answers: curl's connection plus the response headers; other openers until
    # their stream opens.
    connect_timeout_s: float = 30.0
    # No byte for this long (while the reader waits for one) ends the attempt.
    stall_timeout_s: float = 60.0
    # The reader may wait this long in all for one file's bytes (a 512 MB shard at 1 MB/s: ~520 s).
    file_timeout_s: float = 1800.0
    # Attempts per file (1 = no retry); a retry resumes by re-reading and skipping the bytes already
    # delivered, after retry_backoff_s, doubled for each further attempt.
    attempts: int = 3
    retry_backoff_s: float = 1.0
    # HTTP(S) redirects: "same_host" follows those to the same scheme, host and port as the
    # requested URL; "none" follows none; "any" follows any http(s) redirect.
    redirects: str = "same_host"
    # pipe:COMMAND roots run COMMAND with the user's rights. False refuses them (so does the
    # environment variable SMAT_DATA_ALLOW_PIPE=0, which no config can override).
    allow_pipe: bool = True

    def validate(self) -> None:
        for name in ("connect_timeout_s", "stall_timeout_s", "file_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise _error(f"data.remote.{name} must be a positive number of seconds, got {v}")
        if self.attempts < 1:
            raise _error(f"data.remote.attempts must be >= 1, got {self.attempts}")
        if not (self.retry_backoff_s >= 0 and math.isfinite(self.retry_backoff_s)):
            raise _error(f"data.remote.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if self.redirects not in REDIRECT_RULES:
            raise _error(f"data.remote.redirects must be one of {', '.join(REDIRECT_RULES)}, got {self.redirects!r}")


@dataclass
class DataConfig:
    """Where the shards are, which sources/splits feed training, and how episodes are delivered."""

    # Dataset root holding <source>/manifest.json: a local directory, or a URL (http(s)://, s3://,
    # gs://, ... or 'pipe:CMD ...{shard}...') read through webdataset's openers and the shard cache.
    root: str = "data/synth"
    # "shards": training episodes from the data plane (root); "toy": in-memory synthetic episodes
    # (smat_dist.smat.toy) for tests and smoke runs that need no dataset.
    episodes: str = "shards"
    # A node-local copy of ``root`` (same layout); used by readers on nodes where it exists.
    local_root: Optional[str] = None
    # Node-local shard cache for URL roots: whole shards fetched once, checked against the
    # manifest, LRU-evicted within cache_max_gb. Shared by every process on the node.
    cache_dir: str = "~/.cache/smat-dist/shards"
    cache_max_gb: float = 50.0
    # Per episode actor: shards of its next episodes fetched in the background (URL roots);
    # at most this many queued or downloading at once. 0 = off.
    prefetch_shards: int = 2
    train_sources: List[str] = field(default_factory=list)  # empty = every source with train classes
    source_weights: Optional[List[float]] = None  # per train source; None = uniform (MD, SMAT)
    eval_sources: List[str] = field(default_factory=list)  # empty = every source with test classes
    image_size: int = 128
    augment: bool = True  # training augmentation on train-split episodes
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    transform: AugmentConfig = field(default_factory=AugmentConfig)
    # Ray episode actors (per loader). Each actor reads any source; episodes are assigned
    # round-robin, output order is the order of the requested indices.
    num_actors: int = 2
    max_in_flight: int = 4  # episodes requested but not yet consumed, per loader
    # Ray CPUs reserved per actor. 0 lets actors co-exist with trainer workers that already
    # hold every CPU (2 ranks on 2 cores); raise it on clusters with spare cores.
    actor_cpus: float = 0.0
    colocate: bool = True  # place a loader's actors on the node of the process that made it
    actor_start_timeout_s: float = 120.0
    max_open_files: int = 64  # shard file descriptors kept open per reader (LRU)
    remote: RemoteConfig = field(default_factory=RemoteConfig)  # deadlines, retries, redirects, pipe:

    def validate(self) -> None:
        self.episode.validate()
        if self.episodes not in ("shards", "toy"):
            raise _error(f"data.episodes must be shards or toy, got {self.episodes!r}")
        if self.image_size < 8:
            raise _error(f"data.image_size must be >= 8, got {self.image_size}")
        if self.source_weights is not None:
            if not self.train_sources:
                raise _error("data.source_weights needs data.train_sources (the order they refer to)")
            if len(self.source_weights) != len(self.train_sources):
                raise _error(
                    f"data.source_weights has {len(self.source_weights)} entries for "
                    f"{len(self.train_sources)} train_sources"
                )
            if any(w < 0 for w in self.source_weights) or sum(self.source_weights) <= 0:
                raise _error("data.source_weights must be >= 0 with a positive sum")
        if self.num_actors < 1 or self.max_in_flight < 1:
            raise _error("data.num_actors and data.max_in_flight must be >= 1")
        if self.actor_cpus < 0:
            raise _error("data.actor_cpus must be >= 0")
        if self.max_open_files < 1:
            raise _error("data.max_open_files must be >= 1")
        if not self.cache_max_gb > 0:
            raise _error(f"data.cache_max_gb must be > 0, got {self.cache_max_gb}")
        if self.prefetch_shards < 0:
            raise _error(f"data.prefetch_shards must be >= 0 (0 = off), got {self.prefetch_shards}")
        self.remote.validate()

        try:
            DataRoot(self.root, self.remote)
        except RootError as exc:
            raise _error(f"data.root: {exc}") from None
        if len(self.transform.mean) != 3 or len(self.transform.std) != 3:
            raise _error("data.transform.mean/std need 3 values")


__all__ = ["AugmentConfig", "DataConfig", "EpisodeConfig", "IMAGENET_MEAN", "IMAGENET_STD", "REDIRECT_RULES",
           "RemoteConfig"]
