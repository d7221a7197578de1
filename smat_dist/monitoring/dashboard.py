"""The Grafana dashboard of ``cluster/monitoring/``, generated from :mod:`smat_dist.monitoring.names`.

Panels name metrics through :func:`q`, which only accepts names from the names module, so the
dashboard cannot graph a series the code does not export; the tests also parse every expression
with ``promtool`` and compare the committed JSON with :func:`build`.

    python -m smat_dist.monitoring.dashboard              # rewrite cluster/monitoring/grafana/dashboards/smat-dist.json
    python -m smat_dist.monitoring.dashboard --check      # exit 1 if the committed file is stale
    python -m smat_dist.monitoring.dashboard --rules F    # every expression as a Prometheus rules file (promtool)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from smat_dist.monitoring.names import METRICS, metric

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO / "cluster" / "monitoring" / "grafana" / "dashboards" / "smat-dist.json"
DATASOURCE_UID = "smat-prometheus"  # provisioning/datasources/prometheus.yml
DS = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
WORKER = 'run=~"$run", rank=~"$rank"'
# Values that make the template variables valid PromQL when the expressions are checked.
TEMPLATE_VALUES = {"$__rate_interval": "1m", "$run": ".*", "$rank": ".*"}


def q(name: str, selector: str = RUN) -> str:
    """``<stored series name>{selector}`` for a metric of the names module (KeyError otherwise)."""
    return f"{metric(name).series}{{{selector}}}"


def by(labels: str, name: str, selector: str = RUN, agg: str = "avg") -> str:
    # Ray labels every series with its worker process (WorkerId, ...): aggregate them away.
    return f"{agg} by ({labels}) ({q(name, selector)})"


def rate(labels: str, name: str, selector: str = WORKER) -> str:
    return f"sum by ({labels}) (rate({q(name, selector)}[$__rate_interval]))"


# (title, metric names it shows, [(expr, legend)], unit, stacked)
Panel = Tuple[str, Sequence[str], Sequence[Tuple[str, str]], str, bool]

ROWS: List[Tuple[str, List[Panel]]] = [
    ("Progress", [
        ("Meta-steps", ["smat_step", "smat_workers"],
         [(by("run", "smat_step"), "{{run}} step"), (by("run", "smat_workers"), "{{run}} workers")], "short", False),
        ("Tasks per second (all workers)", ["smat_tasks_per_second"],
         [(by("run", "smat_tasks_per_second"), "{{run}}")], "ops", False),
    ]),
    ("Losses and accuracy", [
        ("Loss terms", ["smat_loss"], [(by("run, term", "smat_loss"), "{{run}} {{term}}")], "short", False),
        ("Query accuracy", ["smat_query_accuracy"],
         [(by("run, model", "smat_query_accuracy"), "{{run}} {{model}}")], "percentunit", False),
    ]),
    ("Sparsity constraint", [
        ("Expert sparsity (training gates) and target tau", ["smat_expert_sparsity", "smat_sparsity_target"],
         [(by("run, expert", "smat_expert_sparsity", RUN + ', gate="train"'), "{{run}} expert {{expert}}"),
          (by("run", "smat_sparsity_target"), "{{run}} tau")], "percentunit", False),
        ("Expert sparsity (test gates)", ["smat_expert_sparsity"],
         [(by("run, expert", "smat_expert_sparsity", RUN + ', gate="test"'), "{{run}} expert {{expert}}")],
         "percentunit", False),
        ("Lagrange multipliers lambda", ["smat_lagrange_multiplier"],
         [(by("run, expert", "smat_lagrange_multiplier"), "{{run}} expert {{expert}}")], "short", False),
        ("Expected gate density (L0 term)", ["smat_expert_expected_density"],
         [(by("run, expert", "smat_expert_expected_density"), "{{run}} expert {{expert}}")], "percentunit", False),
    ]),
    ("Expert selection", [
        ("Expert usage alpha by source", ["smat_alpha"],
         [(by("run, source, expert", "smat_alpha"), "{{run}} {{source}} expert {{expert}}")], "percentunit", True),
        ("Entropy of mean alpha by source", ["smat_alpha_entropy", "smat_alpha_task_entropy"],
         [(by("run, source", "smat_alpha_entropy"), "{{run}} {{source}}"),
          (by("run", "smat_alpha_task_entropy"), "{{run}} per-task mean")], "short", False),
        ("Selection temperature", ["smat_selection_temperature"],
         [(by("run", "smat_selection_temperature"), "{{run}}")], "short", False),
    ]),
    ("Step time", [
        ("Step-time split (mean over workers)", ["smat_step_phase_seconds"],
         [(by("run, phase", "smat_step_phase_seconds"), "{{run}} {{phase}}")], "s", True),
        ("Step time per worker", ["smat_worker_step_seconds"],
         [(by("run, rank", "smat_worker_step_seconds", WORKER), "{{run}} rank {{rank}}")], "s", False),
        ("All-reduce + optimiser step per worker", ["smat_worker_allreduce_step_seconds"],
         [(by("run, rank", "smat_worker_allreduce_step_seconds", WORKER), "{{run}} rank {{rank}}")], "s", False),
        ("Images per second per worker", ["smat_images_per_second"],
         [(by("run, rank", "smat_images_per_second", WORKER), "{{run}} rank {{rank}}")], "ops", False),
        ("Rank divergence (must stay 0)", ["smat_rank_state_max_spread"],
         [(by("run", "smat_rank_state_max_spread", agg="max"), "{{run}}")], "short", False),
    ]),
    ("Data plane", [
        ("Episode queue depth per worker", ["smat_episode_queue_depth"],
         [(by("run, rank", "smat_episode_queue_depth", WORKER), "{{run}} rank {{rank}}")], "short", False),
        ("Episodes and images delivered per second", ["smat_data_episodes", "smat_data_images"],
         [(rate("run, rank", "smat_data_episodes"), "{{run}} rank {{rank}} episodes"),
          (rate("run, rank", "smat_data_images"), "{{run}} rank {{rank}} images")], "ops", False),
        ("Shard bytes read per second", ["smat_data_bytes_read"],
         [(rate("run, rank", "smat_data_bytes_read"), "{{run}} rank {{rank}}")], "Bps", False),
        ("Skipped corrupt and replaced samples", ["smat_data_skipped_corrupt", "smat_data_replaced"],
         [(f"sum by (run, rank) ({q('smat_data_skipped_corrupt', WORKER)})", "{{run}} rank {{rank}} skipped"),
          (f"sum by (run, rank) ({q('smat_data_replaced', WORKER)})", "{{run}} rank {{rank}} replaced")],
         "short", False),
        ("Actor seconds building episodes per second", ["smat_data_build_seconds"],
         [(rate("run, rank", "smat_data_build_seconds"), "{{run}} rank {{rank}}")], "short", False),
    ]),
    ("GPU memory", [
        ("GPU memory per worker", ["smat_gpu_memory_allocated_bytes", "smat_gpu_memory_reserved_bytes",
                                   "smat_gpu_memory_peak_bytes"],
         [(by("run, rank", "smat_gpu_memory_allocated_bytes", WORKER), "{{run}} rank {{rank}} allocated"),
          (by("run, rank", "smat_gpu_memory_reserved_bytes", WORKER), "{{run}} rank {{rank}} reserved"),
          (by("run, rank", "smat_gpu_memory_peak_bytes", WORKER), "{{run}} rank {{rank}} peak")], "bytes", False),
    ]),
    ("Sweeps", [
        ("Sweep cells by state", ["smat_sweep_cells"],
         [(f"max by (sweep, state) ({q('smat_sweep_cells', '')})", "{{sweep}} {{state}}")], "short", True),
    ]),
]


def _panel(pid: int, title: str, names: Sequence[str], targets, unit: str, stacked: bool, x: int, y: int) -> dict:
    helps = " ".join(f"{metric(n).series}: {metric(n).help}" for n in names)
    custom: Dict[str, Any] = {"lineWidth": 1, "fillOpacity": 20 if stacked else 0, "showPoints": "never"}
    if stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": pid, "type": "timeseries", "title": title, "description": helps, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "definition": query,
            "query": {"query": query, "refId": f"var_{name}"}, "refresh": 2, "multi": True, "includeAll": True,
            "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
            "hide": 0, "options": []}


VARIABLE_QUERIES = {
    "run": f"label_values({metric('smat_step').series}, run)",
    "rank": f"label_values({metric('smat_worker_step_seconds').series}{{{RUN}}}, rank)",
}


def build() -> dict:
    panels: List[dict] = []
    pid, y = 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (title, names, targets, unit, stacked) in enumerate(row):
            panels.append(_panel(pid, title, names, targets, unit, stacked, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "smat-dist", "title": "smat-dist: SMAT meta-training", "tags": ["smat-dist", "ray"],
        "description": "Training and data-plane metrics of smat-dist runs (Ray application metrics, ray_smat_*), "
                       "per run and per worker. Generated by python -m smat_dist.monitoring.dashboard.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "", "links": [], "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": DATASOURCE_UID}, "hide": 0, "options": [], "refresh": 1},
            _variable("run", "Run", VARIABLE_QUERIES["run"]),
            _variable("rank", "Worker rank", VARIABLE_QUERIES["rank"]),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=True) + "\n"


def expressions(dashboard: Optional[dict] = None) -> Iterator[Tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel."""
    for p in (dashboard or build())["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]


def concrete(expr: str) -> str:
    """The expression with Grafana's template variables replaced by values valid in PromQL."""
    for k in sorted(TEMPLATE_VALUES, key=len, reverse=True):
        expr = expr.replace(k, TEMPLATE_VALUES[k])
    return expr


def variable_queries(dashboard: Optional[dict] = None) -> Dict[str, str]:
    return {v["name"]: v["definition"] for v in (dashboard or build())["templating"]["list"] if v["type"] == "query"}


def variable_selector(query: str) -> str:
    """The series selector inside ``label_values(<selector>, label)``."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
    if not m:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return m.group(1)


def series_in(expr: str) -> List[str]:
    """Metric names an expression selects (identifiers starting with ray_ or smat_ outside strings)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return re.findall(r"\b(?:ray|smat)_[A-Za-z0-9_:]*", bare)


def rules_yaml(dashboard: Optional[dict] = None) -> str:
    """Every dashboard expression (and variable query's metric) as a recording rule, for ``promtool check rules``."""
    import yaml

    rules = [{"record": f"smat_dashboard:expr_{i}", "expr": concrete(expr)}
             for i, (_, expr) in enumerate(expressions(dashboard))]
    rules += [{"record": f"smat_dashboard:variable_{name}", "expr": concrete(variable_selector(query))}
              for name, query in variable_queries(dashboard).items()]
    return yaml.safe_dump({"groups": [{"name": "smat-dist-dashboard", "rules": rules}]}, sort_keys=False)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smat_dist.monitoring.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DASHBOARD_PATH)
    ap.add_argument("--check", action="store_true", help="exit 1 when --out differs from the generated dashboard")
    ap.add_argument("--rules", type=Path, help="write the expressions as a Prometheus rules file")
    args = ap.parse_args(argv)
    if args.rules:
        args.rules.write_text(rules_yaml())
        print(f"wrote {args.rules}")
        return 0
    text = render()
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'STALE: run python -m smat_dist.monitoring.dashboard'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({sum(1 for p in build()['panels'] if p['type'] != 'row')} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build", "render", "expressions", "concrete", "series_in", "rules_yaml", "variable_queries",
           "variable_selector", "ROWS", "METRICS"]
