"""The one list of every metric smat-dist exports: name, type, help text, labels, unit.

The recorders (:mod:`smat_dist.monitoring.recorder`), the Grafana dashboard
(:mod:`smat_dist.monitoring.dashboard`) and the tests all read this module, so a metric cannot be
recorded under one name and graphed under another.

Names as Prometheus stores them: Ray prefixes application metrics with ``ray_`` and counters get
``_total``; a prometheus_client endpoint exports the bare name (and ``_total`` for counters) and the
shipped Prometheus config (``cluster/monitoring/prometheus.yml``) adds the same ``ray_`` prefix when
it scrapes one, so one dashboard serves both. :func:`series_name` gives the stored name.

The metrics.jsonl keys each metric is recorded from, with their labels (loss term, model, phase), are
the run record's vocabulary (:mod:`smat_dist.record`).

Label conventions: ``run`` = ``train.run_name``; ``rank`` = the Ray Train world rank of the worker
that measured it (run-level values are recorded once, by rank 0, without ``rank``); ``expert`` =
expert index ``0..M-1``; ``source`` = meta-training source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

RAY_PREFIX = "ray_"

# loader.stats() counter -> metric name
DATA_COUNTERS = {"episodes": "smat_data_episodes", "images": "smat_data_images", "bytes_read": "smat_data_bytes_read",
                 "skipped_corrupt": "smat_data_skipped_corrupt", "replaced": "smat_data_replaced",
                 "build_seconds": "smat_data_build_seconds"}


@dataclass(frozen=True)
class Metric:
    name: str  # as registered (prometheus_client / ray.util.metrics)
    kind: str  # gauge | counter
    help: str
    labels: Tuple[str, ...]
    unit: str = "short"  # Grafana unit of the dashboard panel
    per_worker: bool = False  # recorded by every rank (label ``rank``) rather than once per run

    @property
    def series(self) -> str:
        return series_name(self)


def series_name(metric: "Metric") -> str:
    """The name Prometheus stores: ``ray_`` + name (+ ``_total`` for counters)."""
    return RAY_PREFIX + metric.name + ("_total" if metric.kind == "counter" else "")


_RUN = ("run",)
_WORKER = ("run", "rank")

METRICS: Tuple[Metric, ...] = (
    # ---------------------------------------------------------------- progress and losses
    Metric("smat_step", "gauge", "Meta-steps (optimiser steps) completed by the run.", _RUN),
    Metric("smat_workers", "gauge", "Data-parallel workers (Ray Train world size) of the run.", _RUN),
    Metric("smat_loss", "gauge",
           "Meta-training loss of the last step by term (total = the optimised loss), mean over the step's "
           "tasks and workers.", ("run", "term")),
    Metric("smat_query_accuracy", "gauge",
           "Accuracy on the query sets of the last step's tasks (0..1): model=student (merged sparse experts), "
           "teacher (dense task teacher), pretrained (frozen theta_pre ProtoNet).", ("run", "model"), "percentunit"),
    # ---------------------------------------------------------------- sparsity and the constraint
    Metric("smat_expert_sparsity", "gauge",
           "Fraction of exactly-zero gates of each expert mask (0..1): gate=train (sampled hard-concrete gates of "
           "the step), test (deterministic test-time gates).", ("run", "expert", "gate"), "percentunit"),
    Metric("smat_expert_expected_density", "gauge",
           "Expected fraction of non-zero gates of each expert (the L0 term the constraint acts on).",
           ("run", "expert"), "percentunit"),
    Metric("smat_sparsity_target", "gauge", "Target sparsity tau: every expert must have at least this share of zero "
           "gates.", _RUN, "percentunit"),
    Metric("smat_lagrange_multiplier", "gauge",
           "Lagrange multiplier lambda of each expert's sparsity constraint (>= 0; 0 while the constraint is met).",
           ("run", "expert")),
    # ---------------------------------------------------------------- expert selection
    Metric("smat_selection_temperature", "gauge", "Temperature of the hypernetwork's expert-selection softmax.", _RUN),
    Metric("smat_alpha", "gauge",
           "Expert usage: mean selection weight alpha of each expert over the last step's tasks from this source "
           "(source=all where tasks are not tagged by source).", ("run", "source", "expert"), "percentunit"),
    Metric("smat_alpha_entropy", "gauge",
           "Entropy (nats) of the mean alpha of the last step's tasks from this source: low = few experts serve it.",
           ("run", "source")),
    Metric("smat_alpha_task_entropy", "gauge", "Mean entropy (nats) of the per-task alpha of the last step.", _RUN),
    # ---------------------------------------------------------------- throughput and time
    Metric("smat_tasks_per_second", "gauge", "Meta-training tasks per second of the last step, all workers.", _RUN,
           "ops"),
    Metric("smat_images_per_second", "gauge",
           "Images delivered to this worker by the data plane per second, averaged since its first step "
           "(episodes are built ahead of the step that uses them).", _WORKER, "ops", True),
    Metric("smat_step_phase_seconds", "gauge",
           "Step-time split, mean over workers: phase=data (waiting for episodes), student (merged forward), "
           "teacher (dense teacher), backward_allreduce (backward + gradient all-reduce + optimiser step).",
           ("run", "phase"), "s"),
    Metric("smat_worker_step_seconds", "gauge", "Wall time of the last meta-step on this worker.", _WORKER, "s", True),
    Metric("smat_worker_allreduce_step_seconds", "gauge",
           "Time this worker spent in the DeepSpeed engine step of the last meta-step (gradient all-reduce and "
           "optimiser step).", _WORKER, "s", True),
    Metric("smat_rank_state_max_spread", "gauge",
           "Largest difference of the global state (step, lambda, temperature, sparsity, parameter sums) between "
           "workers; anything but 0 means ranks diverged.", _RUN),
    # ---------------------------------------------------------------- accelerator memory
    Metric("smat_gpu_memory_allocated_bytes", "gauge", "GPU memory held by tensors on this worker's device.",
           _WORKER, "bytes", True),
    Metric("smat_gpu_memory_reserved_bytes", "gauge", "GPU memory reserved by the PyTorch caching allocator on this "
           "worker's device.", _WORKER, "bytes", True),
    Metric("smat_gpu_memory_peak_bytes", "gauge", "Peak GPU memory held by tensors on this worker's device since "
           "it started.", _WORKER, "bytes", True),
    # ---------------------------------------------------------------- data plane
    Metric("smat_episode_queue_depth", "gauge",
           "Episodes requested from the data-plane actors and not yet consumed by this worker (bounded by "
           "data.max_in_flight); 0 with a slow data plane, the bound with a slow trainer.", _WORKER, "short", True),
    Metric("smat_data_episodes", "counter", "Episodes delivered to this worker by the data plane.", _WORKER,
           "short", True),
    Metric("smat_data_images", "counter", "Images delivered to this worker by the data plane.", _WORKER, "short", True),
    Metric("smat_data_bytes_read", "counter", "Encoded image bytes read from the shards for this worker.", _WORKER,
           "bytes", True),
    Metric("smat_data_skipped_corrupt", "counter",
           "Corrupt samples (undecodable, mismatched member, wrong label, truncated) skipped for this worker.",
           _WORKER, "short", True),
    Metric("smat_data_replaced", "counter", "Skipped samples replaced by another image of the same class.", _WORKER,
           "short", True),
    Metric("smat_data_build_seconds", "counter", "Seconds the data-plane actors spent building this worker's "
           "episodes.", _WORKER, "s", True),
    # ---------------------------------------------------------------- sweeps (smat-sweep driver)
    Metric("smat_sweep_cells", "gauge", "Cells of an ablation sweep by state (pending, running, done, failed).",
           ("sweep", "state")),
)

BY_NAME: Dict[str, Metric] = {m.name: m for m in METRICS}
SERIES: Dict[str, Metric] = {m.series: m for m in METRICS}


def metric(name: str) -> Metric:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; smat_dist/monitoring/names.py lists them all") from None


__all__ = ["Metric", "METRICS", "BY_NAME", "SERIES", "metric", "series_name", "RAY_PREFIX", "DATA_COUNTERS"]
