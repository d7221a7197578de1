"""A real Prometheus scrapes real runs: the single-process trainer (prometheus_client) and 2 Ray workers."""

from __future__ import annotations

import time
import uuid

import pytest

from smat_dist.monitoring import dashboard as D
from smat_dist.monitoring.config import MonitorConfig
from smat_dist.monitoring.names import METRICS

from .conftest import REPO, TINY_MODEL, run_cli

pytestmark = pytest.mark.timeout(900)


def _check_training_series(prom, run: str, final_step: int, experts: int) -> None:
    sel = f'run="{run}"'
    prom.wait(f"max(last_over_time(ray_smat_step{{{sel}}}[10m]))", lambda v: max(v.values()) == final_step)
    last = lambda name, by="": prom.values(f"max by (run{by}) (last_over_time({name}{{{sel}}}[10m]))")  # noqa: E731
    sparsity = prom.values(f"max by (expert, gate) (last_over_time(ray_smat_expert_sparsity{{{sel}}}[10m]))")
    assert len(sparsity) == 2 * experts and all(0.0 <= v <= 1.0 for v in sparsity.values()), sparsity
    lam = last("ray_smat_lagrange_multiplier", ", expert")
    assert len(lam) == experts and all(v >= 0.0 for v in lam.values()), lam
    assert all(v > 0 for v in last("ray_smat_tasks_per_second").values())
    assert all(v > 0 for v in last("ray_smat_selection_temperature").values())
    terms = last("ray_smat_loss", ", term")
    assert {t.split("term=")[1] for t in terms} >= {"total", "query_ce", "kd", "support_ce"}
    alpha = last("ray_smat_alpha", ", source, expert")
    assert len(alpha) >= experts and all(0.0 <= v <= 1.0 for v in alpha.values())
    phases = last("ray_smat_step_phase_seconds", ", phase")
    assert len(phases) == 4 and all(v >= 0 for v in phases.values())
    assert not prom.values('count({__name__=~"ray_smat_.*_created"})'), "prometheus_client _created series leaked"


def test_single_process_trainer_metrics_reach_prometheus(prometheus, synth_small, tmp_path):
    """Trainer.fit(on_step=TrainerMonitor) on shards through the in-process data plane; Prometheus discovers
    the endpoint through the shipped file-SD job and stores its series under the ray_ names."""
    import torch

    from smat_dist.config import RunConfig, load_config
    from smat_dist.data.loader import EpisodeLoader
    from smat_dist.monitoring.recorder import TrainerMonitor
    from smat_dist.smat import SMAT
    from smat_dist.train.launch import Trainer

    run = f"sp-{uuid.uuid4().hex[:6]}"
    cfg = load_config(RunConfig, [REPO / "configs" / "demo" / "smat.yaml"], [
        *TINY_MODEL, "model.backbone.checkpoint=null", f"data.root={synth_small}", "data.episode.num_ways=5",
        "data.episode.num_support=2", "data.episode.num_query=2", "train.tasks_per_step=2", f"train.run_name={run}"])
    torch.manual_seed(0)
    loader = EpisodeLoader(cfg.data, split="train", seed=0, use_ray=False)
    monitor = TrainerMonitor(MonitorConfig(targets_dir=str(prometheus.targets_dir)), run=run, loader=loader,
                             target_sparsity=cfg.model.gates.target_sparsity)
    try:
        Trainer(SMAT(cfg.model), cfg.train).fit(loader, steps=6, on_step=monitor)
        experts = cfg.model.gates.num_experts
        _check_training_series(prometheus, run, final_step=6, experts=experts)  # steps completed, as every launcher
        sel = f'run="{run}", rank="0"'
        images = prometheus.wait(f"ray_smat_data_images_total{{{sel}}}", lambda v: True)
        assert list(images.values()) == [loader.stats()["images"]] and loader.stats()["images"] > 0
        assert list(prometheus.values(f"ray_smat_data_episodes_total{{{sel}}}").values()) == [12.0]
        # episodes are built ahead of the step that uses them, so the last steps may load no new images
        assert list(prometheus.values(f"max_over_time(ray_smat_images_per_second{{{sel}}}[10m])").values())[0] > 0
        assert list(prometheus.values(f"ray_smat_episode_queue_depth{{{sel}}}").values()) == [0.0]  # in-process
        assert list(prometheus.values(f'ray_smat_sparsity_target{{run="{run}"}}').values()) == [0.8]
        alpha = prometheus.values(f'sum by (source) (ray_smat_alpha{{run="{run}"}})')  # α per training source
        assert alpha and all(v == pytest.approx(1.0, abs=1e-4) for v in alpha.values())
        up = [t for t in prometheus.targets() if t["labels"]["job"] == "smat-local"
              and t["scrapeUrl"].startswith(monitor.url)]
        assert up and up[0]["health"] == "up"
    finally:
        monitor.close()
        loader.close()


def test_ray_worker_metrics_reach_prometheus(ray_head, prometheus, tmp_path):
    """A 2-worker run on a real Ray head: Ray's file-SD list leads Prometheus to the node's metrics export port,
    where the workers' application metrics appear, per run and per rank; every dashboard panel that a toy run
    can fill returns data for it."""
    run = f"ray-{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    proc = run_cli("smat_dist.train.cli", [
        "--config", str(REPO / "configs" / "smat.yaml"), *TINY_MODEL, "model.backbone.img_size=16",
        "data.episodes=toy", "dist.num_workers=2", "dist.cpus_per_worker=1", "train.tasks_per_step=2",
        "train.tasks_per_epoch=1000", "train.max_steps=30", "train.checkpoint_every=30", "model.gates.num_experts=3",
        f"train.output_dir={tmp_path}", f"train.run_name={run}"], ray_head.env(), tmp_path,
        log=tmp_path / "train.log")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_training_series(prometheus, run, final_step=30, experts=3)
    ranks = prometheus.values(f'max by (rank) (last_over_time(ray_smat_worker_step_seconds{{run="{run}"}}[10m]))')
    assert sorted(ranks) == ["rank=0", "rank=1"] and all(v > 0 for v in ranks.values())
    spread = prometheus.values(f'max(last_over_time(ray_smat_rank_state_max_spread{{run="{run}"}}[10m]))')
    assert list(spread.values()) == [0.0]
    assert any(t["labels"]["job"] == "ray" and t["scrapeUrl"].startswith(f"http://127.0.0.1:{ray_head.metrics_port}/")
               and t["health"] == "up" for t in prometheus.targets())

    # Every panel whose metrics a toy run records (no data plane, no GPU, no sweep) has data for this run.
    absent = {m.series for m in METRICS if m.name.startswith(("smat_data_", "smat_gpu_", "smat_sweep_"))}
    absent |= {"ray_smat_images_per_second", "ray_smat_episode_queue_depth"}
    # A toy run's series live for only a few 1 s scrapes. Evaluate on the scrape grid (step 1 s) and end the range
    # 2 s after the checks saw the final step, so every sample has an evaluation point after it inside the range
    # (with step 2 s, a series scraped only between the last two points read as empty).
    time.sleep(2)
    end = time.time()
    for title, expr in D.expressions():
        if set(D.series_in(expr)) & absent:
            continue
        concrete = expr.replace("$run", run).replace("$rank", ".*").replace("$__rate_interval", "30s")
        got = prometheus.query_range(concrete, t0, end, step=1)
        assert got, f"panel {title!r}: {concrete} returned no data"
