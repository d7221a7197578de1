"""Metric names, the step-dict mapping, the prometheus_client endpoint, the shipped Prometheus/Grafana files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from smat_dist.monitoring import dashboard as D
from smat_dist.monitoring.config import MonitorConfig
from smat_dist.monitoring.names import BY_NAME, METRICS, SERIES
from smat_dist.monitoring.recorder import NullBackend, PrometheusBackend, StepMonitor, TrainerMonitor, worker_monitor

from .conftest import REPO

MON = REPO / "cluster" / "monitoring"

# The shape of one metrics.jsonl line of a 2-worker run (values from a real toy run, 3 experts).
STEP = {
    "loss": 1.08, "query_ce": 1.04, "support_ce": 0.97, "kd": 1.19, "teacher_ce": 2.32, "sparsity_penalty": 0.0038,
    "lagrangian_term": -0.0038, "query_acc": 0.625, "teacher_acc": 0.2, "pre_acc": 0.8, "alpha_entropy": 1.05,
    "alpha_mean": [0.3, 0.3, 0.4], "temperature": 4.98, "sparsity": [0.17, 0.18, 0.2],
    "sparsity_test": [0.03, 0.035, 0.04], "lambda": [0.0048, 0.0, 0.0054], "expected_density": [0.82, 0.81, 0.8],
    "time_data": 0.001, "time_student": 0.014, "time_teacher": 0.0038, "time_backward": 0.0197,
    "alpha_by_source": {"objects": [0.2, 0.3, 0.5], "glyphs": [1.0, 0.0, 0.0]}, "step": 30, "lr_mult": 1.0,
    "world_size": 2, "tasks_per_s": 34.7, "time_step": 0.0577, "time_allreduce_step": 0.002,
    "global_state_max_spread": 0.0, "grad_norms": {"delta": 12.7},
    "data": {"episodes": 4, "images": 200, "bytes_read": 9000, "skipped_corrupt": 1, "replaced": 1,
             "build_seconds": 0.5, "in_flight": 3, "max_in_flight_seen": 4, "actors": 2},
}


def _by(samples):
    out = {}
    for name, labels, value in samples:
        out.setdefault(name, {})[tuple(sorted(labels.items()))] = value
    return out


# ---------------------------------------------------------------------------------------------- names
def test_names_are_valid_unique_and_ascii():
    assert len({m.name for m in METRICS}) == len(METRICS)
    for m in METRICS:
        assert re.fullmatch(r"smat_[a-z0-9_]+", m.name), m.name
        assert m.kind in ("gauge", "counter")
        assert not m.name.endswith("_total"), "counters get _total from the exporters"
        assert m.help and m.help.isascii(), f"{m.name}: Ray's exporter rejects non-ASCII help texts"
        assert all(re.fullmatch(r"[a-z_]+", label) for label in m.labels)
        assert m.labels[0] in ("run", "sweep")
        assert ("rank" in m.labels) == m.per_worker, m.name
    assert SERIES["ray_smat_data_images_total"].name == "smat_data_images"
    assert SERIES["ray_smat_loss"].kind == "gauge"


# ---------------------------------------------------------------------------------------------- mapping
def test_step_dict_maps_to_run_and_worker_samples():
    mon = StepMonitor(NullBackend(), "r1", target_sparsity=0.9)
    s0 = _by(mon.samples(STEP, rank=0))
    assert s0["smat_step"] == {(("run", "r1"),): 30.0}
    assert s0["smat_loss"][(("run", "r1"), ("term", "total"))] == 1.08
    assert len(s0["smat_loss"]) == 7
    assert s0["smat_query_accuracy"][(("model", "student"), ("run", "r1"))] == 0.625
    assert s0["smat_expert_sparsity"][(("expert", "2"), ("gate", "test"), ("run", "r1"))] == 0.04
    assert len(s0["smat_expert_sparsity"]) == 6
    assert s0["smat_lagrange_multiplier"][(("expert", "1"), ("run", "r1"))] == 0.0
    assert s0["smat_sparsity_target"] == {(("run", "r1"),): 0.9}
    assert s0["smat_alpha"][(("expert", "2"), ("run", "r1"), ("source", "objects"))] == 0.5
    ent = s0["smat_alpha_entropy"]
    assert ent[(("run", "r1"), ("source", "glyphs"))] == 0.0  # one expert serves glyphs
    assert ent[(("run", "r1"), ("source", "objects"))] == pytest.approx(-sum(p * __import__("math").log(p)
                                                                              for p in (0.2, 0.3, 0.5)))
    assert s0["smat_step_phase_seconds"][(("phase", "backward_allreduce"), ("run", "r1"))] == 0.0197
    assert s0["smat_workers"] == {(("run", "r1"),): 2.0}
    w = (("rank", "0"), ("run", "r1"))
    assert s0["smat_worker_step_seconds"][w] == 0.0577
    assert s0["smat_episode_queue_depth"][w] == 3
    assert s0["smat_data_images"][w] == 200  # counters carry increments
    assert s0["smat_images_per_second"][w] == pytest.approx(200 / 0.0577)
    # the next step: increments only, and a rank > 0 records only its own worker values
    nxt = dict(STEP, step=31, data=dict(STEP["data"], images=260, skipped_corrupt=1))
    s1 = _by(mon.samples(nxt, rank=0))
    assert s1["smat_data_images"][w] == 60 and "smat_data_skipped_corrupt" not in s1
    other = _by(StepMonitor(NullBackend(), "r1").samples(STEP, rank=1))
    assert set(other) <= {m.name for m in METRICS if m.per_worker}
    assert (("rank", "1"), ("run", "r1")) in other["smat_worker_step_seconds"]
    assert set(s0) <= set(BY_NAME)


def test_single_process_dict_without_sources_uses_source_all():
    m = {k: v for k, v in STEP.items() if k not in ("alpha_by_source", "data", "time_step")}
    s = _by(StepMonitor(NullBackend(), "sp").samples(m))
    assert {dict(k)["source"] for k in s["smat_alpha"]} == {"all"}
    assert "smat_worker_step_seconds" not in s and "smat_data_images" not in s


def test_monitoring_failures_never_raise(caplog):
    """An exporter that fails for some metrics, or a step dict the mapping cannot read, costs a warning (once
    per metric, not per step) and never an exception; the metrics that can be recorded still are."""

    class HalfBroken(NullBackend):  # gauges fail, counters work
        def __init__(self):
            self.counted = []

        def set(self, spec, labels, value):
            raise RuntimeError("exporter down")

        def inc(self, spec, labels, value):
            self.counted.append((spec.name, value))

    backend = HalfBroken()
    mon = StepMonitor(backend, "x")
    expected = StepMonitor(NullBackend(), "x").samples(STEP)  # a fresh monitor: counters remember what they saw
    gauges = {name for name, _, _ in expected if BY_NAME[name].kind == "gauge"}
    counters = sorted((name, v) for name, _, v in expected if BY_NAME[name].kind == "counter")
    assert gauges and counters
    with caplog.at_level("WARNING", logger="smat_dist.monitoring.recorder"):
        assert mon.record_step(STEP) is None
        mon.record_step(dict(STEP, step=31))
    assert sorted(backend.counted[:len(counters)]) == counters  # every counter of the first step recorded
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(gauges) and all("exporter down" in w for w in warned)  # once each, not per step
    assert {w.split("cannot record ")[1].split(":")[0] for w in warned} == gauges
    caplog.clear()
    with caplog.at_level("WARNING", logger="smat_dist.monitoring.recorder"):
        mon.record_step({"step": 40, "sparsity": 5})  # not a list: the mapping itself fails
    assert [r.getMessage() for r in caplog.records] == ["monitoring: cannot record step: 'int' object is not iterable"]


def test_worker_monitor_from_run_config(tmp_path):
    from smat_dist.config import RunConfig, load_config
    from smat_dist.errors import ConfigError
    from smat_dist.train.recipe import rank_monitor

    cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"], ["monitor.enabled=false"])
    assert isinstance(worker_monitor(cfg.monitor, run="r", rank=0).backend, NullBackend)
    cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"],
                      ["monitor.backend=prometheus", f"monitor.targets_dir={tmp_path}"])
    mon = rank_monitor(cfg, 1, default_backend="ray")
    try:
        assert isinstance(mon.backend, PrometheusBackend) and mon.target_sparsity == 0.9
        assert mon.run == cfg.train.run_name
    finally:
        mon.close()
    cfg = load_config(RunConfig, [REPO / "configs" / "pmf.yaml"], ["monitor.enabled=false"])
    assert rank_monitor(cfg, 0, default_backend="ray").target_sparsity is None  # no gates, no τ
    with pytest.raises(ConfigError, match="monitor.backend"):
        load_config(RunConfig, [REPO / "configs" / "smat.yaml"], ["monitor.backend=statsd"])


# ---------------------------------------------------------------------------------------------- endpoint
def test_prometheus_client_endpoint_serves_and_announces(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    stale = tmp_path / f"old@{os.uname().nodename}-999999999.json"  # a killed process's file
    stale.write_text("[]")
    mon = TrainerMonitor(MonitorConfig(targets_dir=str(tmp_path)), run="ep", target_sparsity=0.5)
    try:
        assert mon.url.startswith("http://127.0.0.1:")
        mon(STEP)
        text = urllib.request.urlopen(mon.url, timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["smat_loss"].documentation == BY_NAME["smat_loss"].help
        images = [s for s in fams["smat_data_images"].samples if s.name == "smat_data_images_total"]
        assert images[0].value == 200 and images[0].labels == {"run": "ep", "rank": "0"}
        files = list(tmp_path.glob("*.json"))
        assert not stale.exists() and len(files) == 1
        assert json.loads(files[0].read_text())[0]["targets"] == [mon.url.split("/")[2]]
    finally:
        mon.close()
    assert not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------- shipped files
def test_committed_dashboard_is_the_generated_one():
    assert (MON / "grafana" / "dashboards" / "smat-dist.json").read_text() == D.render(), \
        "run: python -m smat_dist.monitoring.dashboard"


def test_dashboard_covers_every_metric_and_names_only_exported_ones():
    board = json.loads((MON / "grafana" / "dashboards" / "smat-dist.json").read_text())
    named = set()
    for title, expr in D.expressions(board):
        found = D.series_in(expr)
        assert found, f"{title}: {expr} selects no smat metric"
        unknown = [s for s in found if s not in SERIES]
        assert not unknown, f"{title}: {unknown} are not exported (smat_dist/monitoring/names.py)"
        named.update(found)
    for name, query in D.variable_queries(board).items():
        assert set(D.series_in(query)) <= set(SERIES), name
    missing = {m.series for m in METRICS} - named
    assert not missing, f"metrics without a panel: {missing}"
    # per run and per worker
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "run", "rank"}
    per_worker = [e for _, e in D.expressions(board) if 'rank=~"$rank"' in e]
    assert per_worker and all("rank" in e.split("(")[1] for e in per_worker if e.startswith(("avg", "sum", "max")))


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian: apt-get install prometheus)")


@needs_promtool
def test_every_dashboard_expression_parses_with_promtool(tmp_path):
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(D.rules_yaml(json.loads((MON / "grafana" / "dashboards" / "smat-dist.json").read_text())))
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(list(D.expressions())) + len(D.variable_queries())
    assert f"SUCCESS: {n} rules found" in out.stdout + out.stderr


@needs_promtool
def test_promtool_rejects_a_broken_expression(tmp_path):
    """The check above can fail: a typo in an expression is caught."""
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "avg by (run (ray_smat_loss)"}]}]}))
    out = subprocess.run(["promtool", "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


@needs_promtool
def test_shipped_prometheus_config_passes_promtool():
    out = subprocess.run(["promtool", "check", "config", str(MON / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["smat-local"]["file_sd_configs"][0]["files"] == [f"{MonitorConfig().targets_dir}/*.json"]


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["uid"] == D.DATASOURCE_UID
    assert src["url"].startswith("http://127.0.0.1:")
    prov = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "smat-dist.yml").read_text())
    (p,) = prov["providers"]
    assert p["type"] == "file" and p["options"]["path"].startswith("/")
    howto = (REPO / "docs" / "operations.md").read_text()
    assert f":{p['options']['path']}" in howto, "docs/operations.md must mount the dashboards where the provider reads them"
    board = D.build()
    assert board["templating"]["list"][0]["current"]["value"] == D.DATASOURCE_UID
    assert all(t["datasource"]["uid"] == "${datasource}" for p in board["panels"] for t in p.get("targets", []))
