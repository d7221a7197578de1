"""Where episodes are scored: this process, or a set of Ray actors (one model copy each).

Both pools take chunks of :class:`~smat_dist.eval.worker.Job` and yield ``(chunk_id, results)``
as chunks finish; the runner re-orders by episode, so completion order never shows in the output.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Deque, Dict, Iterator, List, Sequence, Tuple

from smat_dist import ray_session
from smat_dist.eval.config import EvalConfig
from smat_dist.eval.models import ModelSpec
from smat_dist.eval.worker import EpisodeEvaluator, EpisodeResult, EvalActor, Job

log = logging.getLogger(__name__)


class LocalPool:
    def __init__(self, spec: ModelSpec, cfg: EvalConfig):
        import torch

        self._threads = torch.get_num_threads()  # the evaluator may change it; restored on close
        self.ev = EpisodeEvaluator(spec, cfg, cfg.threads)
        self.workers = 1

    def info(self) -> List[Dict[str, object]]:
        return [self.ev.info()]

    def map(self, chunks: Sequence[List[Job]]) -> Iterator[Tuple[int, List[EpisodeResult]]]:
        for i, c in enumerate(chunks):
            yield i, self.ev.run(c)

    def stats(self) -> Dict[str, float]:
        return self.ev.stats()

    def close(self) -> None:
        import torch

        self.ev.close()
        torch.set_num_threads(self._threads)


class RayPool:
    """``cfg.actors`` actors, each holding the model; chunks go to whichever actor is free."""

    def __init__(self, spec: ModelSpec, cfg: EvalConfig):
        import ray

        self.started = ray_session.connect()
        res = ray.cluster_resources()
        n = cfg.actors
        cpus = cfg.actor_cpus if cfg.actor_cpus is not None else min(1.0, float(res.get("CPU", 1.0)) / n)
        gpus = cfg.actor_gpus if cfg.actor_gpus is not None else min(1.0, float(res.get("GPU", 0.0)) / n)
        threads = cfg.threads or max(1, int(cpus))
        opts: Dict[str, Any] = {"num_cpus": cpus, "max_restarts": 0}
        if gpus > 0:
            opts["num_gpus"] = gpus
        self.cpus, self.gpus, self.threads = cpus, gpus, threads
        cls = ray.remote(EvalActor).options(**opts)
        self.actors = [cls.remote(spec, cfg, threads) for _ in range(n)]
        self.workers = n
        try:
            self._info = ray.get([a.info.remote() for a in self.actors], timeout=cfg.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            avail = ray.available_resources()
            self.close()
            raise RuntimeError(
                f"{n} eval actors ({cpus:g} CPU, {gpus:g} GPU each) did not start within "
                f"{cfg.actor_start_timeout_s:g} s; cluster resources available: {avail}. Lower actors, "
                f"actor_cpus or actor_gpus") from None
        except Exception:
            self.close()
            raise
        log.info("%d eval actors: %.2f CPU, %.2f GPU, %d threads each", n, cpus, gpus, threads)

    def info(self) -> List[Dict[str, object]]:
        return list(self._info)

    def map(self, chunks: Sequence[List[Job]]) -> Iterator[Tuple[int, List[EpisodeResult]]]:
        import ray

        todo: Deque[int] = collections.deque(range(len(chunks)))
        running: Dict[Any, Tuple[int, int]] = {}  # ref -> (chunk id, actor id)
        load = [0] * len(self.actors)
        per_actor = 2  # one running, one queued: no idle gap between chunks
        try:
            while todo or running:
                for a in range(len(self.actors)):
                    while todo and load[a] < per_actor:
                        i = todo.popleft()
                        running[self.actors[a].run.remote(chunks[i])] = (i, a)
                        load[a] += 1
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    i, a = running.pop(ref)
                    load[a] -= 1
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
                    yield i, out
        finally:
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

    def stats(self) -> Dict[str, float]:
        import ray

        total: Dict[str, float] = {}
        for s in ray.get([a.stats.remote() for a in self.actors]):
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if getattr(self, "started", False):
            ray.shutdown()
            self.started = False


def make_pool(spec: ModelSpec, cfg: EvalConfig):
    return RayPool(spec, cfg) if cfg.actors > 0 else LocalPool(spec, cfg)


__all__ = ["LocalPool", "RayPool", "make_pool"]
