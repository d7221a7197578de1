"""sweep.csv and the two figures, from the cells' smat-eval results and training metrics.

* ``sweep.csv``: one row per cell (:func:`cell_row`): axis values, derived columns (method, experts, tau, sources, seed),
  ID/OOD averages with 95 % CIs, sparsity reached, wall time, GPU-hours, status.
* ``tradeoff.png``: ID avg vs OOD avg, colour = tau, marker = number of experts (the paper's Fig. (a));
  cells without a colour value (PMF and other methods without experts) are drawn as reference stars.
* ``scaling.png``: ID and OOD avg vs number of meta-training sources, one line per method (the
  paper's "scales less well" comparison).

The average of a group of sources is their unweighted mean (as Table 1); its CI half-width combines
the per-source half-widths of independent episode sets, sqrt(sum ci_i^2) / k.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from smat_dist.fsutil import atomic_write_text
from smat_dist.plotting import pyplot, save
from smat_dist.record import read_rows
from smat_dist.sweep.config import CONFIG_AXIS, CellResources
from smat_dist.sweep.grid import Cell
from smat_dist.sweep.state import FAILED, CellState

FIXED_COLUMNS = [
    "cell", "status", "method", "num_experts", "tau", "train_sources", "num_train_sources", "seed",
    "id_avg", "id_ci95", "ood_avg", "ood_ci95", "id_sources", "ood_sources", "episodes",
    "sparsity_reached", "sparsity_train", "steps", "train_s", "eval_s", "wall_s", "gpu_hours", "attempts",
    "run_dir", "eval_dir", "error",
]


class ResultsError(ValueError):
    pass


def read_eval_results(path: Path, mode: str = "none") -> Dict[str, Any]:
    """ID/OOD averages of one smat-eval results.csv (rows of ``mode``)."""
    if not path.exists():
        raise ResultsError(f"{path}: smat-eval wrote no results.csv")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mode", "none") == mode]
    if not rows:
        raise ResultsError(f"{path}: no rows of mode {mode!r}")
    methods = sorted({r["method"] for r in rows})
    out: Dict[str, Any] = {"method": methods[0] if len(methods) == 1 else "+".join(methods)}
    for kind in ("ID", "OOD"):
        group = [r for r in rows if r["kind"] == kind]
        key = kind.lower()
        if not group:
            out.update({f"{key}_avg": None, f"{key}_ci95": None, f"{key}_sources": ""})
            continue
        acc = [float(r["accuracy"]) for r in group]
        ci = [float(r["ci95"]) for r in group]
        out[f"{key}_avg"] = sum(acc) / len(acc)
        out[f"{key}_ci95"] = math.sqrt(sum(c * c for c in ci)) / len(ci)
        out[f"{key}_sources"] = "+".join(sorted(r["source"] for r in group))
    out["episodes"] = min(int(r["n"]) for r in rows)
    out["per_source"] = {r["source"]: float(r["accuracy"]) for r in rows}
    return out


def cell_row(cell: Cell, st: CellState, *, axes: List[str], resources: CellResources, run_dir: Path,
             eval_dir: Path) -> Dict[str, Any]:
    """The ``sweep.csv`` row of one cell: its axis values, its setting, its results and what it cost."""
    run, r = cell.run, st.results
    row: Dict[str, Any] = {"cell": cell.id, "status": st.status, "_axes": axes}
    for k, v in cell.assignment.items():
        row[k] = "+".join(Path(str(p)).stem for p in (v if isinstance(v, list) else [v])) \
            if k == CONFIG_AXIS else v
    sources = list(run.data.train_sources)
    n_id = len([s for s in str(r.get("id_sources") or "").split("+") if s])
    row.update(
        method=r.get("method") or run.model.method, num_experts=run.model.gates.num_experts,
        tau=run.model.gates.target_sparsity if run.model.gates.enabled else None,
        train_sources="+".join(sources) if sources else "all",
        num_train_sources=len(sources) if sources else (n_id or None), seed=run.train.seed,
        id_avg=r.get("id_avg"), id_ci95=r.get("id_ci95"), ood_avg=r.get("ood_avg"), ood_ci95=r.get("ood_ci95"),
        id_sources=r.get("id_sources"), ood_sources=r.get("ood_sources"), episodes=r.get("episodes"),
        sparsity_reached=r.get("sparsity_reached"), sparsity_train=r.get("sparsity_train"),
        steps=r.get("steps"), train_s=st.train_s or None, eval_s=st.eval_s or None,
        wall_s=(st.train_s + st.eval_s) or None,
        gpu_hours=(st.train_s * resources.gpus() + st.eval_s * resources.eval_gpus()) / 3600.0,
        attempts=len([a for a in st.attempts if a.outcome in ("done", "failed")]),
        run_dir=str(run_dir), eval_dir=str(eval_dir),
        error=st.last_error if st.status == FAILED else "")
    return row


def read_training(run_dir: Union[Path, str]) -> Dict[str, Any]:
    """Steps and sparsity reached (mean over experts of the last logged step) from metrics.jsonl (of a run
    directory or a run in object storage)."""
    from smat_dist import objstore

    if isinstance(run_dir, str) and objstore.is_uri(run_dir):
        from smat_dist.runstore import fetch_run_file

        try:
            p = fetch_run_file(run_dir, "metrics.jsonl")
        except FileNotFoundError:
            return {}
    else:
        p = Path(run_dir) / "metrics.jsonl"
    rows = read_rows(p) if p.exists() else []  # a torn last line (a crash mid-write) is skipped with a warning
    if not rows:
        return {}
    last = rows[-1]

    def mean(v):
        return sum(v) / len(v) if isinstance(v, list) and v else None

    return {"steps": last.get("step"), "sparsity_reached": mean(last.get("sparsity_test")),
            "sparsity_train": mean(last.get("sparsity"))}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def write_csv(rows: Sequence[Dict[str, Any]], axis_keys: Sequence[str], path: Path) -> Path:
    cols = list(FIXED_COLUMNS[:2]) + [k for k in axis_keys] + [c for c in FIXED_COLUMNS[2:] if c not in axis_keys]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in cols])
    atomic_write_text(path, buf.getvalue())
    return path


def _groups(rows: Iterable[Dict[str, Any]], keys: Sequence[str]) -> Dict[tuple, List[Dict[str, Any]]]:
    out: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(json.dumps(r.get(k)) for k in keys)].append(r)
    return out


def _mean_std(values: List[float]):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def reference_points(rows: Sequence[Dict[str, Any]], color: str = "tau") -> Dict[str, tuple]:
    """method -> (ID mean, ID std, OOD mean, OOD std) over the finished cells that have no ``color`` value
    (e.g. PMF in a tau sweep): the reference the trade-off is read against."""
    refs = [r for r in rows if r.get("id_avg") is not None and r.get("ood_avg") is not None
            and r.get(color) in (None, "")]
    out = {}
    for (method,), members in sorted(_groups(refs, ["method"]).items()):
        out[str(json.loads(method))] = (*_mean_std([float(r["id_avg"]) for r in members]),
                                        *_mean_std([float(r["ood_avg"]) for r in members]))
    return out


def plot_tradeoff(rows: Sequence[Dict[str, Any]], path: Path, color: str = "tau", marker: str = "num_experts",
                  title: Optional[str] = None) -> Optional[Path]:
    """ID vs OOD average per (colour, marker, other axes) group, mean ± std over seeds."""
    import matplotlib
    from matplotlib import cm, colors

    plt = pyplot()

    done = [r for r in rows if r.get("id_avg") is not None and r.get("ood_avg") is not None
            and r.get(color) not in (None, "")]
    if not done:
        return None
    group_keys = [k for k in rows[0].get("_axes", []) if k not in ("train.seed",)] or [color, marker]
    groups = _groups(done, sorted(set(group_keys) | {color, marker, "method"}))
    cvals = sorted({float(r[color]) for r in done})
    norm = colors.Normalize(min(cvals), max(cvals) if max(cvals) > min(cvals) else min(cvals) + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    mvals = sorted({str(r.get(marker)) for r in done}, key=lambda s: (len(s), s))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for members in groups.values():
        xi, xs = _mean_std([float(r["id_avg"]) for r in members])
        yo, ys = _mean_std([float(r["ood_avg"]) for r in members])
        c = cmap(norm(float(members[0][color])))
        mk = MARKERS[mvals.index(str(members[0].get(marker))) % len(MARKERS)]
        ax.errorbar(xi, yo, xerr=xs or None, yerr=ys or None, fmt=mk, color=c, ms=9, mec="black", capsize=3)
    for mv in mvals:
        ax.scatter([], [], marker=MARKERS[mvals.index(mv) % len(MARKERS)], color="grey", edgecolors="black",
                   label=f"{marker} = {mv}")
    for method, (xi, xs, yo, ys) in reference_points(rows, color).items():
        ax.errorbar(xi, yo, xerr=xs or None, yerr=ys or None, fmt="*", color="red", ms=14, mec="black", capsize=3,
                    label=f"{method} (reference)")
    ax.legend(loc="best", fontsize=8)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=color)
    ax.set_xlabel("ID average accuracy (%)")
    ax.set_ylabel("OOD average accuracy (%)")
    ax.set_title(title or f"ID vs OOD trade-off by {color} and {marker}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def plot_scaling(rows: Sequence[Dict[str, Any]], path: Path, x: str = "num_train_sources", series: str = "method",
                 title: Optional[str] = None) -> Optional[Path]:
    """ID and OOD average vs ``x``, one line per ``series`` value, mean ± std over the other cells."""
    plt = pyplot()
    done = [r for r in rows if r.get("id_avg") is not None and r.get(x) not in (None, "")]
    if not done:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    by_series = _groups(done, [series])
    for (skey,), members in sorted(by_series.items()):
        label = json.loads(skey)
        for ax, col in zip(axes, ("id_avg", "ood_avg")):
            pts = []
            for (xkey,), at in sorted(_groups(members, [x]).items(), key=lambda kv: float(json.loads(kv[0][0]))):
                vals = [float(r[col]) for r in at if r.get(col) is not None]
                if vals:
                    m, s = _mean_std(vals)
                    pts.append((float(json.loads(xkey)), m, s))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=str(label))
    from matplotlib.ticker import MaxNLocator

    for ax, name in zip(axes, ("ID average", "OOD average")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Accuracy vs {x.replace('_', ' ')} per {series}")
    fig.tight_layout()
    return save(fig, path)


__all__ = ["FIXED_COLUMNS", "ResultsError", "cell_row", "read_eval_results", "read_training", "write_csv", "plot_tradeoff",
           "plot_scaling", "reference_points"]
