"""Episode delivery: in-process, or through a pool of Ray actors with bounded prefetch.

Usage (trainer rank ``r`` of ``W``)::

    loader = EpisodeLoader(cfg.data, split="train", seed=cfg.train.seed)       # use_ray=True
    for ep in loader.iterate(rank_indices(start_step, tasks_per_step, r, W)):  # ep.index == g
        ...
    loader.close()

* ``iterate(indices)`` accepts any iterable of global episode numbers and yields
  :class:`~smat_dist.episode.Episode` objects in the same order. Episode ``g`` depends only on
  ``(seed, split, source list, g)``, so resuming is passing the later indices, and the stream
  is the same for 1 or N actors, in-process or on Ray.
* ``iterate_specs(specs)`` materialises frozen evaluation episodes (deterministic eval
  transform) through the same pool.
* Backpressure: at most ``cfg.max_in_flight`` episodes are requested and not yet handed out.
  Actors return uint8 pixels (a quarter of float32); normalisation happens here.
* Each loader owns its actors (``cfg.num_actors``, ``cfg.actor_cpus`` CPUs each, placed on the
  caller's node when ``cfg.colocate``), so every trainer rank gets its own pool reading the
  shards from that node's ``root`` (shared storage) or ``local_root`` (node-local copy), or,
  for a URL root, from the node's shard cache. Then each job also carries the next jobs that
  actor will get (``LOOKAHEAD_PER_ACTOR`` per actor), whose shards it prefetches in the
  background (``cfg.prefetch_shards``), so first-touch downloads overlap training.
* ``stats()`` is a plain counter dict (episodes, images, bytes_read, skipped_corrupt,
  skipped_<reason>, replaced, ...) summed over the actors, for the metrics layer.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from smat_dist.data.builder import COUNTERS, EpisodeBuilder, EpisodeSpec, RawEpisode
from smat_dist.data.config import DataConfig
from smat_dist.data.store import DataError

if TYPE_CHECKING:
    from smat_dist.episode import Episode

log = logging.getLogger(__name__)


def rank_indices(step_start: int, tasks_per_step: int, rank: int, world_size: int,
                 num_steps: Optional[int] = None) -> Iterator[int]:
    """Global episode numbers of ``rank``: meta-step ``s`` owns ``g in [s*T, (s+1)*T)`` and
    rank ``r`` takes ``g = s*T + r, s*T + r + W, ...``. Disjoint across ranks, covering every g,
    and a resume from step ``k`` is ``step_start=k``. Any ``T``: rank ``r`` gets :func:`tasks_of_rank` of
    them per step (⌈T/W⌉ or ⌊T/W⌋). Infinite when ``num_steps`` is None."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    s = step_start
    while num_steps is None or s < step_start + num_steps:
        yield from range(s * tasks_per_step + rank, (s + 1) * tasks_per_step, world_size)
        s += 1


def tasks_of_rank(tasks_per_step: int, rank: int, world_size: int) -> int:
    """How many of a meta-step's tasks :func:`rank_indices` gives ``rank``: ⌈T/W⌉ for the first T mod W ranks."""
    return len(range(rank, tasks_per_step, world_size))


LOOKAHEAD_PER_ACTOR = 2  # upcoming episodes per actor whose shards are prefetched


class _Lookahead:
    """A job iterator read ``depth`` jobs ahead, so that builders can warm those jobs' shards."""

    def __init__(self, jobs: Iterable[tuple], depth: int):
        self._it = iter(jobs)
        self._buf: Deque[tuple] = collections.deque()
        self._depth = depth
        self._done = False

    def next(self) -> Optional[tuple]:
        while not self._done and len(self._buf) <= self._depth:
            job = next(self._it, None)
            if job is None:
                self._done = True
            else:
                self._buf.append(job)
        return self._buf.popleft() if self._buf else None

    def upcoming(self, submitted: int, n: int) -> List[Any]:
        """Payloads (episode numbers or specs) of the buffered jobs that go to the same actor as
        job ``submitted`` (jobs are assigned round-robin over ``n`` actors)."""
        if not self._depth:
            return []
        return [job[1] for k, job in enumerate(self._buf) if (submitted + 1 + k) % n == submitted % n]


class EpisodeActor:
    """Ray actor body: one :class:`EpisodeBuilder` per actor (its own file handles)."""

    def __init__(self, cfg: DataConfig, split: str, seed: int, sources: Optional[List[str]], augment: Optional[bool]):
        self.builder = EpisodeBuilder(cfg, split, seed, sources, augment)

    def ready(self) -> Tuple[str, List[str]]:
        import ray

        return ray.get_runtime_context().get_node_id(), self.builder.sources

    def build(self, g: int, warm: Sequence[Any] = ()) -> RawEpisode:
        return self.builder.build(g, warm)

    def materialise(self, spec: EpisodeSpec, augment: bool, warm: Sequence[Any] = ()) -> RawEpisode:
        return self.builder.materialise(spec, augment, warm)

    def stats(self) -> Dict[str, float]:
        return self.builder.stats()


class EpisodeLoader:
    """Ordered, deterministic episodes from the shards; see the module docstring."""

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0, sources: Optional[Sequence[str]] = None,
                 use_ray: bool = True, augment: Optional[bool] = None, num_actors: Optional[int] = None,
                 device=None):
        self.cfg = cfg
        self.split = split
        self.seed = int(seed)
        self.use_ray = bool(use_ray)
        # Where episodes are handed out: actors send uint8 pixels, which become float32 on this
        # device (a GPU rank's: a quarter of the bytes cross PCIe, normalised there).
        self.device = device
        self._counters: Dict[str, float] = {k: 0 for k in COUNTERS}
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self._actors: List[Any] = []
        # The local builder also resolves sources and fails fast on a bad root/manifest/shard.
        self._local = EpisodeBuilder(cfg, split, seed, sources, augment)
        self.sources = list(self._local.sources)
        self.augment = self._local.augment
        if self.use_ray:
            self._start_actors(num_actors or cfg.num_actors, sources, augment)

    def _start_actors(self, n: int, sources, augment) -> None:
        import ray

        if not ray.is_initialized():
            raise DataError("EpisodeLoader(use_ray=True) needs ray.init() first (or use_ray=False)")
        opts: Dict[str, Any] = {"num_cpus": self.cfg.actor_cpus, "max_restarts": 0}
        if self.cfg.colocate:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=True)
        cls = ray.remote(EpisodeActor).options(**opts)
        src = list(sources) if sources is not None else None
        self._actors = [cls.remote(self.cfg, self.split, self.seed, src, augment) for _ in range(n)]
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=self.cfg.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise DataError(
                f"{n} episode actors ({self.cfg.actor_cpus} CPUs each) did not start within "
                f"{self.cfg.actor_start_timeout_s}s; cluster resources available: {ray.available_resources()}. "
                "Lower data.actor_cpus or data.num_actors.") from None
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise DataError(f"episode actor failed to start: {exc}") from None

    # -- iteration --------------------------------------------------------------------

    def iterate(self, indices: Iterable[int]) -> Iterator["Episode"]:
        """Episodes for the global numbers in ``indices``, in that order."""
        return self._run(("build", int(g)) for g in indices)

    def iterate_specs(self, specs: Iterable[EpisodeSpec], augment: bool = False) -> Iterator["Episode"]:
        """Frozen episodes (e.g. from :func:`load_episode_list`), eval transform unless ``augment``."""
        return self._run(("spec", s, augment) for s in specs)

    def episode(self, g: int) -> "Episode":
        return next(iter(self.iterate([g])))

    @property
    def prefetching(self) -> bool:
        """True when builders warm the shard cache ahead (URL root, ``prefetch_shards`` > 0)."""
        return self._local.catalog.remote and self.cfg.prefetch_shards > 0

    def _run(self, jobs: Iterable[tuple]) -> Iterator["Episode"]:
        mean, std = self.cfg.transform.mean, self.cfg.transform.std
        n = len(self._actors) if self.use_ray else 1
        ahead = _Lookahead(jobs, LOOKAHEAD_PER_ACTOR * n if self.prefetching else 0)
        if not self.use_ray:
            while True:
                job = ahead.next()
                if job is None:
                    return
                warm = ahead.upcoming(0, 1)
                raw = self._local.build(job[1], warm) if job[0] == "build" else \
                    self._local.materialise(job[1], job[2], warm)
                self._merge(raw.stats)
                yield raw.to_episode(mean, std, self.device)
        import ray

        pending: Deque[Any] = collections.deque()
        submitted = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.cfg.max_in_flight:
                    job = ahead.next()
                    if job is None:
                        exhausted = True
                        break
                    actor = self._actors[submitted % n]
                    # the jobs this actor gets next (round-robin), for its shard prefetch
                    warm = ahead.upcoming(submitted, n)
                    ref = actor.build.remote(job[1], warm) if job[0] == "build" else \
                        actor.materialise.remote(job[1], job[2], warm)
                    pending.append(ref)
                    submitted += 1
                self.in_flight = len(pending)
                self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
                if not pending:
                    return
                ref = pending.popleft()
                try:
                    raw: RawEpisode = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise exc.as_instanceof_cause() from None
                del ref
                self.in_flight = len(pending)
                self._merge(raw.stats)
                yield raw.to_episode(mean, std, self.device)
        finally:
            for ref in pending:  # abandoned generator: drop (and cancel) queued work
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            self.in_flight = 0

    # -- plans, stats, lifecycle ------------------------------------------------------------

    def plan(self, g: int) -> EpisodeSpec:
        """Which images episode ``g`` holds (cheap: no pixels)."""
        return self._local.plan(g)

    def _merge(self, delta: Dict[str, float]) -> None:
        for k, v in delta.items():
            self._counters[k] = self._counters.get(k, 0) + v

    def stats(self) -> Dict[str, float]:
        out = dict(self._counters)
        out["in_flight"] = self.in_flight
        out["max_in_flight_seen"] = self.max_in_flight_seen
        out["actors"] = len(self._actors)
        return out

    def close(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            self._actors = []
        self._local.close()

    def __enter__(self) -> "EpisodeLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def materialise(spec: EpisodeSpec, builder: EpisodeBuilder, augment: bool = False) -> "Episode":
    """One frozen episode in this process (eval transform unless ``augment``)."""
    t = builder.cfg.transform
    return builder.materialise(spec, augment).to_episode(t.mean, t.std)


__all__ = ["EpisodeActor", "EpisodeLoader", "materialise", "rank_indices", "tasks_of_rank"]
