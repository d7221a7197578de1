"""Turn the per-step metrics dict (one ``metrics.jsonl`` line) into Prometheus samples.

One :class:`StepMonitor` per trainer process. It maps the step dict onto the metrics of
:mod:`smat_dist.monitoring.names` and hands them to a backend:

* :class:`RayBackend` - ``ray.util.metrics`` inside Ray workers: the samples join the node's Prometheus
  export (``ray_<name>``) that Ray already serves and announces for discovery;
* :class:`PrometheusBackend` - a ``prometheus_client`` endpoint for processes outside Ray (the
  single-process trainer, tools), on 127.0.0.1 by default, announced by a file-SD target file.

Run-level values (losses, sparsity, λ, α ...) are identical on every rank after the step's
all-reduce, so only rank 0 records them; per-worker values (its step time, data-plane counters,
queue depth, GPU memory) are recorded by every rank with a ``rank`` label.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from smat_dist.fsutil import atomic_write_text, pid_alive
from smat_dist.monitoring.config import MonitorConfig
from smat_dist.monitoring.names import BY_NAME, DATA_COUNTERS, Metric, metric
from smat_dist.record import ACCURACY_KEYS, LOSS_KEYS, PHASE_KEYS, StepMetrics

log = logging.getLogger(__name__)

Sample = Tuple[str, Dict[str, str], float]  # metric name, labels, value (the increment for counters)


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _entropy(p: List[float]) -> float:
    s = sum(x for x in p if x > 0)
    if s <= 0:
        return 0.0
    return -sum((x / s) * math.log(x / s) for x in p if x > 0)


class StepMonitor:
    """Records one step dict per call; see the module docstring for what goes where."""

    def __init__(self, backend: "Backend", run: str, every: int = 1, target_sparsity: Optional[float] = None):
        self.backend = backend
        self.run = str(run)
        self.every = max(1, int(every))
        self.target_sparsity = target_sparsity
        self._data_seen: Dict[str, float] = {}
        self._data_clock: Optional[float] = None  # when this worker's first step ended (rate's time origin)
        self._data_images = 0.0  # images delivered since then (summed deltas: loaders restart from 0)
        self._warned: set = set()

    # -- public -------------------------------------------------------------------------------
    def record_step(self, m: Union[StepMetrics, Mapping[str, Any]], rank: int = 0) -> None:
        """Record one step (a :class:`StepMetrics`, or a ``metrics.jsonl`` row)."""
        if not isinstance(m, StepMetrics):
            m = StepMetrics.from_row(m)
        if m.step % self.every:
            return
        try:
            samples = self.samples(m, rank)
        except Exception as exc:  # monitoring must never stop training
            self._warn("step", exc)
            return
        for name, labels, value in samples:
            spec = BY_NAME[name]
            try:
                (self.backend.inc if spec.kind == "counter" else self.backend.set)(spec, labels, value)
            except Exception as exc:
                self._warn(name, exc)

    def _warn(self, what: str, exc: Exception) -> None:
        if what not in self._warned:  # once per metric, not every step
            self._warned.add(what)
            log.warning("monitoring: cannot record %s: %s", what, exc)

    def close(self) -> None:
        self.backend.close()

    # -- the mapping (pure apart from the data-counter memory) ---------------------------------
    def samples(self, m: Union[StepMetrics, Mapping[str, Any]], rank: int = 0) -> List[Sample]:
        if not isinstance(m, StepMetrics):
            m = StepMetrics.from_row(m)
        out: List[Sample] = []
        if int(rank) == 0:
            out += self._run_samples(m)
        out += self._worker_samples(m, str(int(rank)))
        return out

    def _run_samples(self, m: StepMetrics) -> List[Sample]:
        run = self.run
        out: List[Sample] = []

        def put(name: str, value: Any, **labels: str) -> None:
            v = _num(value)
            if v is not None:
                out.append((name, {"run": run, **labels}, v))

        put("smat_step", m.step)
        put("smat_workers", m.world_size)
        for key, term in LOSS_KEYS.items():
            put("smat_loss", getattr(m, key), term=term)
        for key, model in ACCURACY_KEYS.items():
            put("smat_query_accuracy", getattr(m, key), model=model)
        for values, gate in ((m.sparsity, "train"), (m.sparsity_test, "test")):
            for e, v in enumerate(values or []):
                put("smat_expert_sparsity", v, expert=str(e), gate=gate)
        for e, v in enumerate(m.expected_density or []):
            put("smat_expert_expected_density", v, expert=str(e))
        for e, v in enumerate(m.lagrange or []):
            put("smat_lagrange_multiplier", v, expert=str(e))
        if self.target_sparsity is not None:
            put("smat_sparsity_target", self.target_sparsity)
        put("smat_selection_temperature", m.temperature)
        by_source = m.alpha_by_source or ({"all": m.alpha_mean} if m.alpha_mean else {})
        for source, alpha in by_source.items():
            for e, v in enumerate(alpha):
                put("smat_alpha", v, source=str(source), expert=str(e))
            put("smat_alpha_entropy", _entropy([float(a) for a in alpha]), source=str(source))
        put("smat_alpha_task_entropy", m.alpha_entropy)
        put("smat_tasks_per_second", m.tasks_per_s)
        for key, phase in PHASE_KEYS.items():
            put("smat_step_phase_seconds", getattr(m, key), phase=phase)
        put("smat_rank_state_max_spread", m.global_state_max_spread)
        return out

    def _worker_samples(self, m: StepMetrics, rank: str) -> List[Sample]:
        labels = {"run": self.run, "rank": rank}
        out: List[Sample] = []

        def put(name: str, value: Any) -> None:
            v = _num(value)
            if v is not None:
                out.append((name, dict(labels), v))

        step_s = _num(m.time_step)
        put("smat_worker_step_seconds", step_s)
        put("smat_worker_allreduce_step_seconds", m.time_allreduce_step)
        if m.data:
            put("smat_episode_queue_depth", m.data.get("in_flight"))
            for key, name in DATA_COUNTERS.items():
                cur = _num(m.data.get(key))
                if cur is None:
                    continue
                last = self._data_seen.get(key, 0.0)
                delta = cur - last if cur >= last else cur  # a new loader starts again from 0
                self._data_seen[key] = cur
                if delta > 0:
                    out.append((name, dict(labels), delta))
                if key == "images":
                    # A rate over the run so far, not over the last step: episodes are built ahead of the step
                    # that uses them (prefetch), so one step's own delivery says little about throughput.
                    now = time.monotonic()
                    if self._data_clock is None:
                        self._data_clock = now - (step_s or 0.0)
                    self._data_images += max(0.0, delta)
                    if now > self._data_clock:
                        put("smat_images_per_second", self._data_images / (now - self._data_clock))
        for name, value in gpu_memory().items():
            put(name, value)
        return out


def gpu_memory() -> Dict[str, float]:
    """This process's CUDA memory, where it has initialised a CUDA device (never initialises one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return {}
        dev = torch.cuda.current_device()
        return {"smat_gpu_memory_allocated_bytes": float(torch.cuda.memory_allocated(dev)),
                "smat_gpu_memory_reserved_bytes": float(torch.cuda.memory_reserved(dev)),
                "smat_gpu_memory_peak_bytes": float(torch.cuda.max_memory_allocated(dev))}
    except Exception:
        return {}


# ------------------------------------------------------------------------------------ backends
class Backend:
    def set(self, spec: Metric, labels: Dict[str, str], value: float) -> None:
        raise NotImplementedError

    def inc(self, spec: Metric, labels: Dict[str, str], value: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullBackend(Backend):
    def set(self, spec, labels, value) -> None:
        pass

    def inc(self, spec, labels, value) -> None:
        pass


_RAY_METRICS: Dict[str, Any] = {}  # one ray.util.metrics object per name and process
_RAY_LOCK = threading.Lock()


class RayBackend(Backend):
    """``ray.util.metrics``: exported by the node's metrics agent as ``ray_<name>`` (counters ``_total``)."""

    def _get(self, spec: Metric):
        with _RAY_LOCK:
            obj = _RAY_METRICS.get(spec.name)
            if obj is None:
                from ray.util import metrics as rm

                cls = rm.Counter if spec.kind == "counter" else rm.Gauge
                obj = _RAY_METRICS[spec.name] = cls(spec.name, description=spec.help, tag_keys=spec.labels)
            return obj

    def set(self, spec, labels, value) -> None:
        self._get(spec).set(value, tags=labels)

    def inc(self, spec, labels, value) -> None:
        if value > 0:
            self._get(spec).inc(value, tags=labels)


class PrometheusBackend(Backend):
    """A private ``prometheus_client`` registry served over HTTP, announced in ``targets_dir``."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, targets_dir: Optional[str] = None,
                 name: str = "smat"):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: Dict[str, Any] = {}
        self._server, self._thread = start_http_server(int(port), addr=address, registry=self.registry)
        self.port = int(self._server.server_port)
        host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
        self.target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.target_file: Optional[Path] = None
        if targets_dir:
            self.target_file = announce_target(Path(targets_dir), self.target, name)
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    def _get(self, spec: Metric):
        obj = self._metrics.get(spec.name)
        if obj is None:
            import prometheus_client as pc

            cls = pc.Counter if spec.kind == "counter" else pc.Gauge
            obj = self._metrics[spec.name] = cls(spec.name, spec.help, labelnames=spec.labels, registry=self.registry)
        return obj

    def set(self, spec, labels, value) -> None:
        self._get(spec).labels(**labels).set(value)

    def inc(self, spec, labels, value) -> None:
        if value > 0:
            self._get(spec).labels(**labels).inc(value)

    def close(self) -> None:
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
            self.target_file = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def announce_target(directory: Path, target: str, name: str) -> Path:
    """Write a Prometheus file-SD file for ``target`` (atomically) and drop ones of dead processes."""
    directory.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in directory.glob(f"*@{host}-*.json"):  # this host's leftovers of killed processes
        pid = old.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    path = directory / f"{safe}@{host}-{os.getpid()}.json"
    atomic_write_text(path, json.dumps([{"targets": [target], "labels": {}}]))  # never read half-written
    return path


# ------------------------------------------------------------------------------------ factories
def make_backend(cfg: MonitorConfig, default: str, name: str) -> Backend:
    cfg.validate()
    if not cfg.enabled:
        return NullBackend()
    kind = default if cfg.backend == "auto" else cfg.backend
    if kind == "ray":
        return RayBackend()
    return PrometheusBackend(cfg.address, cfg.port, cfg.targets_dir, name)


def worker_monitor(mon: MonitorConfig, *, run: str, rank: int, target_sparsity: Optional[float] = None,
                   default_backend: str = "ray") -> StepMonitor:
    """The monitor of one training rank of run ``run`` (``train.run_name``): Ray application metrics inside
    Ray workers, a prometheus_client endpoint per rank elsewhere. ``target_sparsity`` is τ of a gated
    model (None without gates), exported beside the measured sparsity."""
    try:
        backend = make_backend(mon, default_backend, f"{run}-rank{rank}")
    except OSError as exc:  # e.g. a fixed monitor.port that is taken: train anyway
        log.warning("monitoring disabled on rank %s: %s", rank, exc)
        backend = NullBackend()
    return StepMonitor(backend, run, mon.every, target_sparsity)


class TrainerMonitor(StepMonitor):
    """``on_step`` callback of the single-process :class:`~smat_dist.train.launch.Trainer`.

    ``Trainer.fit(provider, on_step=TrainerMonitor(cfg.monitor, run, loader=provider))``; serves the
    metrics at :attr:`url` until :meth:`close`. A loader (``EpisodeLoader``) adds data-plane metrics.
    """

    def __init__(self, cfg: Optional[MonitorConfig] = None, run: str = "smat", loader: Any = None,
                 target_sparsity: Optional[float] = None):
        cfg = cfg or MonitorConfig()
        super().__init__(make_backend(cfg, "prometheus", run), run, cfg.every, target_sparsity)
        self.loader = loader
        self._last = time.perf_counter()

    @property
    def url(self) -> Optional[str]:
        return getattr(self.backend, "url", None)

    def __call__(self, m: Union[StepMetrics, Mapping[str, Any]]) -> None:
        now = time.perf_counter()
        m = m if isinstance(m, StepMetrics) else StepMetrics.from_row(m)
        if m.time_step is None:
            m.time_step = now - self._last
        self._last = now
        stats = getattr(self.loader, "stats", None)
        if callable(stats) and not m.data:
            m.data = dict(stats())
        self.record_step(m, rank=0)


__all__ = ["StepMonitor", "TrainerMonitor", "Backend", "NullBackend", "RayBackend", "PrometheusBackend",
           "make_backend", "worker_monitor", "gpu_memory", "announce_target", "metric"]
