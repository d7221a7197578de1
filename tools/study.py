#!/usr/bin/env python
"""The CPU-scale study behind docs/results.md: one command per study reproduces docs/results/<study>/.

    python tools/study.py select     # the demo's SMAT settings, chosen on the VALID split (toy_select.yaml)
    python tools/study.py tradeoff   # tau x number of experts, PMF as the reference (toy_tradeoff.yaml)
    python tools/study.py sources    # number of training sources x {SMAT, PMF} (toy_sources.yaml)
    python tools/study.py tradeoff --fresh      # from scratch: drop the sweep's earlier cells first
    python tools/study.py attribution  # which part of SMAT carries its OOD gain (toy_attribution.yaml, 5 seeds)
    python tools/study.py long       # 3x the demo's steps, SMAT and PMF, against the attribution cells (toy_long.yaml)
    python tools/study.py long_tau   # τ = 0.5 and 0.95 at 3x the steps, against the long study's cells (toy_long_tau.yaml)
    python tools/study.py outlier    # M = 2, τ = 0.95 on this code, 3 seeds: is seed 2 still an outlier? (toy_outlier.yaml)
    python tools/study.py constraint # M x tau short runs of the demo's SMAT: does every expert reach tau?
    python tools/study.py specialisation  # M = 4: α by source against two nulls (toy_specialisation.yaml)
    python tools/study.py seedlevel  # seed-level intervals for the published tradeoff and sources sweep.csv

Each study:

1. the demo's stages 1-2 (``smat_dist.demo``: the synthetic benchmark and θ_pre in ``runs/demo``; reused
   when their settings did not change);
2. ``smat-sweep --config configs/sweeps/toy_<study>.yaml`` exactly as a user runs it (resumable: a second
   call skips finished cells), with the benchmark and θ_pre as absolute paths;
3. Pre (θ_pre as a ProtoNet) on the same episodes; tradeoff only: every cell evaluated on the valid split
   as well (``valid.csv``), the SMAT setting chosen on it (:func:`choose`; test episodes choose nothing)
   and ``smat-eval analyse`` of that setting's seed-0 cell, plus paired contrasts between τ and M values;
4. ``summary.md``: per setting, mean over seeds, and the paired difference to PMF of the same seed and
   training sources over the shared frozen episodes (every cell is evaluated on the same episode lists,
   so per-episode differences cancel most of the episode-to-episode variance);
5. copies sweep.csv, the figures, summary.md, the wall times of every invocation (timing.jsonl) and every
   cell's results.csv + episodes.csv (per-episode accuracies, episode-list sha256: ``episodes/<cell>/``) to
   ``docs/results/<study>/``.

Paired differences come from ``smat_dist.eval.stats`` (episode lists checked; the summary gives both the
episode-only interval and the seeds × episodes one).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_OUT = REPO / "runs" / "demo"
SWEEPS = REPO / "configs" / "sweeps"
DOCS = REPO / "docs" / "results"
VALID_EVAL = ["split=valid", "episodes=100"]
# Columns that describe a cell's setting besides its axes (sweep.csv); the seed is what is averaged over.
SETTING_COLUMNS = ("method", "num_experts", "tau", "train_sources")

if TYPE_CHECKING:
    from smat_dist.eval.report import ResultRow
    from smat_dist.eval.stats import EpisodeScores


def env() -> Dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    e.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return e


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- inputs
def demo_inputs() -> Dict[str, Path]:
    """The demo's benchmark and θ_pre (its stages 1-2, same settings, reused when unchanged)."""
    from smat_dist.demo import PRETRAIN_DEFAULTS, build_backbone, build_data

    DEMO_OUT.mkdir(parents=True, exist_ok=True)
    data = build_data(DEMO_OUT, 1.0)
    backbone = build_backbone(DEMO_OUT, data, [])
    say(f"benchmark {data}; θ_pre {backbone} ({' '.join(PRETRAIN_DEFAULTS)})")
    return {"data": data.resolve(), "backbone": backbone.resolve()}


def run_sweep(config: Path, inputs: Dict[str, Path], *, num_cpus: int) -> float:
    cmd = [sys.executable, "-m", "smat_dist.sweep.cli", "--config", str(config), "--num-cpus", str(num_cpus),
           "--set", f"data.root={inputs['data']}", "--set", f"model.backbone.checkpoint={inputs['backbone']}"]
    say("smat-sweep " + " ".join(cmd[3:]))
    t0 = time.time()
    rc = subprocess.call(cmd, env=env(), cwd=REPO)
    if rc != 0:
        raise SystemExit(f"study: smat-sweep exited {rc}; re-run the same command to resume")
    return time.time() - t0


def sweep_dir(config: Path) -> Path:
    from smat_dist.sweep.config import load_sweep_config

    cfg = load_sweep_config(config)
    return (REPO / cfg.out).resolve() if cfg.out else REPO / "runs" / "sweeps" / cfg.name


# ----------------------------------------------------------------------------------------------- tables
def read_csv(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def scores(eval_dir: Path) -> EpisodeScores:
    """Per-episode accuracies (mode none) of one smat-eval output, with its episode-list hashes; read once
    per run of the study (the summary, both contrasts and the choice read the same cells)."""
    from smat_dist.eval.report import read_episode_scores

    return read_episode_scores(eval_dir)


@functools.lru_cache(maxsize=None)
def per_source(eval_dir: Path) -> Dict[str, ResultRow]:
    """source -> smat-eval's result row (mode none) of one evaluation (read once, as :func:`scores`)."""
    from smat_dist.eval.report import read_results

    return {r.source: r for r in read_results(eval_dir / "results.csv") if r.mode == "none"}


def id_ood(kinds: Dict[str, ResultRow]) -> tuple:
    """(ID sources, OOD sources) of one evaluation's :func:`per_source` rows, in its order."""
    return ([s for s, x in kinds.items() if x.kind == "ID"], [s for s, x in kinds.items() if x.kind == "OOD"])


EQUIV_MARGIN = 0.5  # points: "equal ID" means the 90 % seeds × episodes interval lies inside ± this (TOST)


def paired(a: Sequence[EpisodeScores], b: Sequence[EpisodeScores], sources: Sequence[str]) -> dict:
    """a − b averaged over ``sources`` on the same frozen episodes, seed ``s`` of a paired with seed ``s``
    of b (smat_dist.eval.stats; mismatched episode lists stop the study). ``episodes``: the episode-only
    95 % interval (seeds averaged per episode, as this study reported before); ``two_level``: seeds ×
    episodes (None with one seed); ``equiv``: the TOST verdict at :data:`EQUIV_MARGIN` (two-level)."""
    from smat_dist.eval.stats import EpisodeMismatch, episode_interval, equivalence, paired_differences, \
        two_level_interval

    if not sources or not a:
        return dict(episodes=None, two_level=None, equiv=None)
    try:
        d = paired_differences(a, b, sources)
    except EpisodeMismatch as exc:
        raise SystemExit(f"study: {exc}") from None
    multi = len(a) > 1
    return dict(episodes=episode_interval(d), two_level=two_level_interval(d) if multi else None,
                equiv=equivalence(d, EQUIV_MARGIN) if multi else None)


def _ms(vals: List[Optional[float]], *, spread: bool = True) -> str:
    """Mean ± sample std over seeds ("-" when there is nothing; no ± for one value or ``spread=False``)."""
    from smat_dist.eval.stats import mean_ci95

    m, _, sd, n = mean_ci95(v for v in vals if v is not None)
    if n == 0:
        return "-"
    return f"{m:.2f} ± {sd:.2f}" if spread and n > 1 else f"{m:.2f}"


def _pm(interval) -> str:
    return "-" if interval is None else str(interval)


def _mci(interval) -> tuple:
    """(mean, half-width) of an interval, (None, None) without one (the figures' format)."""
    return (None, None) if interval is None else (interval.mean, interval.half)


def setting_key(row: Dict[str, str], axes: Sequence[str]) -> tuple:
    return tuple(row.get(k, "") for k in axes if k != "train.seed") + tuple(row.get(c, "") for c in SETTING_COLUMNS)


def plot_source_deltas(deltas: List[dict], path: Path) -> Optional[Path]:
    """SMAT − PMF (paired, 95 % CI) vs the number of training sources: ID, OOD and the test-only sources,
    one point per choice of sources. Unlike scaling.png, the test-only panel compares like with like."""
    from smat_dist.plotting import pyplot, save

    plt = pyplot()
    pts = [d for d in deltas if d["id"][0] is not None]
    if not pts:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, key, title in zip(axes, ("id", "ood", "fixed"), ("ID (the cell's training sources)",
                                                              "OOD (every other source)", "test-only OOD (signs, digits, patterns)")):
        for i, d in enumerate(sorted(pts, key=lambda d: (len(d["row"]["train_sources"].split("+")), d["row"]["train_sources"]))):
            n = len(d["row"]["train_sources"].split("+"))
            m, ci = d[key]
            if m is None:
                continue
            x = n + (i % 2) * 0.12 - 0.06
            ax.errorbar([x], [m], yerr=[ci], fmt="o", capsize=3, color="C1")
            ax.annotate(d["row"]["train_sources"].replace("+", "+\n") if n < 4 else "all 4", (x, m), fontsize=6,
                        xytext=(4, 2), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("number of training sources")
        ax.set_xticks([1, 2, 3, 4])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SMAT − PMF, paired (points)")
    fig.suptitle("SMAT − PMF on the same test episodes (mean of seeds, 95 % CI over episodes)")
    fig.tight_layout()
    return save(fig, path)


def plot_cell_curves(rows: List[Dict[str, str]], path: Path, title: str) -> Optional[Path]:
    """Training curves of each finished cell, one line per seed: the sparsest and the densest expert's
    training sparsity, the largest λ, α's entropy relative to uniform, and the training query accuracy
    minus θ_pre's on the same tasks (10-step means), from each cell's metrics.jsonl."""
    from smat_dist.plotting import pyplot, save
    from smat_dist.record import read_rows

    plt = pyplot()
    cells = [r for r in rows if r["status"] == "done" and (Path(r["run_dir"]) / "metrics.jsonl").exists()]
    if not cells:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, r in enumerate(sorted(cells, key=lambda r: int(r["seed"]))):
        ms = [m for m in read_rows(Path(r["run_dir"]) / "metrics.jsonl") if m.get("sparsity")]
        steps = [m["step"] for m in ms]
        color, label = f"C{i}", f"seed {r['seed']}"
        axes[0].plot(steps, [min(m["sparsity"]) for m in ms], color=color, label=label)
        axes[0].plot(steps, [max(m["sparsity"]) for m in ms], color=color, ls=":")
        axes[1].plot(steps, [max(m["lambda"]) for m in ms], color=color)
        M = len(ms[0]["sparsity"])
        axes[2].plot(steps, [m["alpha_entropy"] / math.log(M) for m in ms if m.get("alpha_entropy") is not None],
                     color=color)
        gain = [100 * (m["query_acc"] - m["pre_acc"]) for m in ms if m.get("pre_acc") is not None]
        smooth = [sum(gain[max(0, k - 9):k + 1]) / len(gain[max(0, k - 9):k + 1]) for k in range(len(gain))]
        axes[3].plot(steps[:len(smooth)], smooth, color=color)
    tau = num(cells[0].get("tau"))
    if tau is not None:
        axes[0].axhline(tau, color="k", lw=0.8, ls="--")
    for ax, name in zip(axes, ("training sparsity (solid: sparsest expert, dotted: densest; τ dashed)",
                               "largest λ", "α entropy / log M", "train query acc − θ_pre acc (points)")):
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("meta-step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def summarise(out: Path, rows: List[Dict[str, str]], axes: Sequence[str], valid: Dict[str, dict], *,
              split: str = "test", pre: Optional[Dict[str, Path]] = None) -> tuple:
    """(summary.md text, the paired SMAT − PMF differences per setting): one line per setting (seeds pooled)
    with paired differences to PMF."""
    done = [r for r in rows if r["status"] == "done"]
    eps = {r["cell"]: scores(Path(r["eval_dir"])) for r in done}
    src = {r["cell"]: per_source(Path(r["eval_dir"])) for r in done}
    # sources that are OOD in every cell (never trained on, whatever the cell's training sources)
    always_ood = sorted(set.intersection(*(set(s for s, x in src[r["cell"]].items() if x.kind == "OOD")
                                           for r in done))) if done else []
    refs = defaultdict(list)  # (train_sources, seed) -> PMF cells
    for r in done:
        if r["method"].lower() == "pmf":
            refs[(r["train_sources"], r["seed"])].append(r)
    groups = defaultdict(list)
    for r in done:
        groups[setting_key(r, axes)].append(r)

    lines = [f"# {out.name}: summary", "",
             "Generated by `python tools/study.py` from the sweep's cells. Per setting: mean ± std over seeds "
             "of the ID / OOD averages (smat-eval's grouping: ID = the cell's training sources), the mean of the "
             "cells' own 95 % CIs (episode sampling), the test-gate sparsity reached, and the **paired** "
             "difference to PMF with the same seed and training sources on the same frozen episodes "
             "(Δ ± 95 % CI over episodes, seeds averaged per episode; this CI covers episode sampling, not "
             "training randomness), the same difference with its 95 % interval over **seeds × episodes** "
             "(smat_dist.eval.stats.two_level_interval: what a claim about the method needs) and whether ID is "
             f"equal within ±{EQUIV_MARGIN:g} points (TOST on the 90 % seeds × episodes interval: equivalent / "
             "different / unresolved). "
             f"'Test-only OOD' = the sources no cell trains on ({', '.join(always_ood) or 'none'}).", "",
             f"Split: **{split}** episodes (100 per source).", ""]
    has_valid = bool(valid)
    head = ["setting", "seeds", "ID avg", "ID CI", "OOD avg", "OOD CI", "test-only OOD", "sparsity",
            "Δ ID vs PMF", "Δ OOD vs PMF", "Δ test-only OOD vs PMF", "Δ ID vs PMF (seeds × episodes)",
            "Δ OOD vs PMF (seeds × episodes)", f"ID equal to PMF within ±{EQUIV_MARGIN:g}?",
            "Δ ID / Δ OOD per seed"] + \
        (["valid ID avg"] if has_valid else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas = []
    for key, members in sorted(groups.items(), key=lambda kv: _order(kv[1][0])):
        r0 = members[0]
        label = _label(r0, axes)
        ids, oods = id_ood(src[r0["cell"]])
        fixed_avg = [sum(src[m["cell"]][s].accuracy for s in always_ood) / len(always_ood)
                     for m in members] if always_ood else []
        cells = [m for m in members if refs.get((m["train_sources"], m["seed"]))]
        none = dict(episodes=None, two_level=None, equiv=None)
        d_id = d_ood = d_fix = none
        if r0["method"].lower() != "pmf" and cells:
            cells = sorted(cells, key=lambda m: int(m["seed"]))
            mine = [eps[m["cell"]] for m in cells]
            ref = [eps[reference(m, refs[(m["train_sources"], m["seed"])], axes)["cell"]] for m in cells]
            d_id, d_ood, d_fix = paired(mine, ref, ids), paired(mine, ref, oods), paired(mine, ref, always_ood)
            deltas.append(dict(row=r0, id=_mci(d_id["episodes"]), ood=_mci(d_ood["episodes"]),
                               fixed=_mci(d_fix["episodes"])))
        cols = [label, str(len(members)), _ms([num(m["id_avg"]) for m in members]),
                _ms([num(m["id_ci95"]) for m in members], spread=False),
                _ms([num(m["ood_avg"]) for m in members]), _ms([num(m["ood_ci95"]) for m in members], spread=False),
                _ms(fixed_avg), _ms([num(m["sparsity_reached"]) for m in members]),
                _pm(d_id["episodes"]), _pm(d_ood["episodes"]), _pm(d_fix["episodes"]), _pm(d_id["two_level"]),
                _pm(d_ood["two_level"]), d_id["equiv"].verdict if d_id["equiv"] else "-", per_seed(cells, refs, axes)]
        if has_valid:
            cols.append(_ms([valid.get(m["cell"], {}).get("id_avg") for m in members]))
        lines.append("| " + " | ".join(cols) + " |")
    pre_src = per_source(pre["test"]) if pre else {}
    if pre_src:  # θ_pre as a ProtoNet, grouped as the 4-source cells (all ID sources trained on)
        from smat_dist.sweep.report import read_eval_results

        p = read_eval_results(pre["test"] / "results.csv")
        cols = ["Pre (θ_pre ProtoNet, all 4 ID sources as ID)", "-", f"{p['id_avg']:.2f}", f"{p['id_ci95']:.2f}",
                f"{p['ood_avg']:.2f}", f"{p['ood_ci95']:.2f}",
                f"{sum(pre_src[s].accuracy for s in always_ood) / len(always_ood):.2f}" if always_ood else "-"] + ["-"] * 8
        if has_valid:
            cols.append(f"{valid_eval_avg(pre['valid']):.2f}" if pre.get("valid") else "-")
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "Per source (mean over seeds, %):", ""]
    sources = sorted({s for c in src.values() for s in c})
    lines += ["| setting | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for key, members in sorted(groups.items(), key=lambda kv: _order(kv[1][0])):
        vals = []
        for s in sources:
            v = [src[m["cell"]][s].accuracy for m in members if s in src[m["cell"]]]
            vals.append(f"{sum(v) / len(v):.2f}" if v else "-")
        lines.append(f"| {_label(members[0], axes)} | " + " | ".join(vals) + " |")
    if pre_src:
        lines.append("| Pre | " + " | ".join(f"{pre_src[s].accuracy:.2f}" if s in pre_src else "-"
                                             for s in sources) + " |")
    return "\n".join(lines) + "\n", deltas


def pre_eval(rows: List[Dict[str, str]], out: Path, data: Path, splits: Sequence[str]) -> Dict[str, Path]:
    """smat-eval --method pre (θ_pre of a cell trained on every ID source) on the study's episodes."""
    cells = [r for r in rows if r["status"] == "done"]
    run = max(cells, key=lambda r: len(r["train_sources"].split("+")))["run_dir"]
    res = {}
    for split in splits:
        dest = out / "pre" / split
        if not (dest / "results.csv").exists():
            cmd = [sys.executable, "-m", "smat_dist.eval.cli", "--method", "pre", "--checkpoint", run, "--data",
                   str(data), "--out", str(dest), "-q", "episodes=100"] + ([f"split={split}"] if split != "test" else [])
            if subprocess.call(cmd, env=env(), stdout=subprocess.DEVNULL) != 0:
                raise SystemExit(f"study: smat-eval --method pre ({split}) failed")
        res[split] = dest
    return res


def per_seed(cells: List[Dict[str, str]], refs, axes: Sequence[str]) -> str:
    """Each seed's own ID and OOD differences to its PMF (averages of the two cells; no pairing)."""
    out = []
    for m in sorted(cells, key=lambda m: int(m["seed"])):
        if m["method"].lower() == "pmf" or num(m["ood_avg"]) is None and num(m["id_avg"]) is None:
            continue
        ref = reference(m, refs[(m["train_sources"], m["seed"])], axes)
        d = [num(m[c]) - num(ref[c]) if num(m[c]) is not None and num(ref[c]) is not None else None
             for c in ("id_avg", "ood_avg")]
        out.append(f"s{m['seed']}: " + " / ".join("-" if x is None else f"{x:+.2f}" for x in d))
    return ", ".join(out) or "-"


def reference(row: Dict[str, str], candidates: List[Dict[str, str]], axes: Sequence[str]) -> Dict[str, str]:
    """The PMF cell to compare with: same seed and sources, then the one agreeing on most other axes
    (e.g. the same offset learning rate); among equally close ones the strongest (highest ID average on
    the sweep's split), so a SMAT setting no PMF cell shares is compared with PMF at its best."""
    return max(candidates, key=lambda c: (sum(c.get(k) == row.get(k) for k in axes if k != "config"),
                                          num(c.get("id_avg")) or 0.0))


def _order(r: Dict[str, str]):
    return (r["method"].lower() != "pmf", len(r["train_sources"].split("+")), r["train_sources"], num(r.get("num_experts")) or 0,
            num(r.get("tau")) or 0, json.dumps({k: v for k, v in r.items() if k.startswith("model.")}))


def _label(r: Dict[str, str], axes: Sequence[str]) -> str:
    parts = [r["method"].upper()]
    if r["method"].lower() != "pmf" and num(r.get("tau")) is not None:  # no τ: no gates (e.g. the attribution's)
        parts.append(f"M={r['num_experts']} τ={num(r['tau']):g}")
    for k in axes:
        if k in ("config", "train.seed", "model.gates.num_experts", "model.gates.target_sparsity",
                 "data.train_sources"):
            continue
        v = r.get(k, "")
        parts.append(f"{k.rsplit('.', 1)[-1]}={num(v):g}" if num(v) is not None else f"{k.rsplit('.', 1)[-1]}={v}")
    if "data.train_sources" in axes:
        parts.append(f"[{r['train_sources']}]")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- diagnostics
def diagnose(rows: List[Dict[str, str]], axes: Sequence[str]) -> str:
    """Do the masks learn, does α specialise, what does λ do, how far does the model move from θ_pre?
    From each finished cell's metrics.jsonl and exported model (no evaluation)."""
    import torch

    from smat_dist.export import load_model
    from smat_dist.record import read_rows

    head = ["setting", "seed", "step τ reached", "test sparsity", "max λ", "α entropy / ln M",
            "α spread over sources", "‖θ_i − θ_pre‖ (uniform α)", "train acc − θ_pre acc (last 40 steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in rows if r["status"] == "done"), key=lambda r: (_order(r), r["seed"])):
        run = Path(r["run_dir"])
        m = load_model(run / "model.safetensors")
        M = m.num_experts
        alpha = torch.full((M,), 1.0 / M) if m.gates is not None else torch.ones(1)
        moved = float((m.merged_weights(alpha) - m.theta_pre).norm())
        mr = read_rows(run / "metrics.jsonl")
        tail = mr[-max(1, len(mr) // 4):]
        gain = 100 * sum(x["query_acc"] - x["pre_acc"] for x in tail if x.get("pre_acc") is not None) / len(tail) \
            if any(x.get("pre_acc") is not None for x in tail) else None
        cols = [_label(r, axes), r["seed"]]
        if m.gates is not None:
            tau = m.cfg.gates.target_sparsity
            reached = next((x["step"] for x in mr if min(x.get("sparsity") or [0]) >= tau - 0.01), None)
            last = mr[-1]
            # α per source: the mean over the run's last quarter, then max - min over sources per expert
            acc = defaultdict(list)
            for x in tail:
                for src, v in (x.get("alpha_by_source") or {}).items():
                    acc[src].append(v)
            means = [[sum(c) / len(c) for c in zip(*v)] for v in acc.values()]
            spread = max(max(col) - min(col) for col in zip(*means)) if len(means) > 1 else None
            ent = sum(x["alpha_entropy"] for x in tail) / len(tail) / math.log(M) if M > 1 else None
            cols += [str(reached) if reached is not None else "never", f"{sum(last['sparsity_test']) / M:.3f}",
                     f"{max(max(x['lambda']) for x in mr):.3f}", "-" if ent is None else f"{ent:.3f}",
                     "-" if spread is None else f"{spread:.3f}"]
        else:
            cols += ["-"] * 5
        cols += [f"{moved:.3f}", "-" if gain is None else f"{gain:+.2f} points"]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- valid
def valid_eval(rows: List[Dict[str, str]], out: Path, data: Path, *, jobs: int) -> Dict[str, dict]:
    """smat-eval split=valid of every finished cell (skipped when its results exist) -> valid.csv."""
    from smat_dist.sweep.report import read_eval_results

    todo = [r for r in rows if r["status"] == "done"]

    def one(r):
        dest = out / "valid" / r["cell"]
        if not (dest / "results.csv").exists():
            cmd = [sys.executable, "-m", "smat_dist.eval.cli", "--checkpoint", r["run_dir"], "--data", str(data),
                   "--out", str(dest), "-q", *VALID_EVAL]
            with (out / "logs" / f"{r['cell']}.valid.log").open("w") as f:
                if subprocess.call(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT) != 0:
                    raise SystemExit(f"study: valid evaluation of {r['cell']} failed (see {f.name})")
        return r["cell"], read_eval_results(dest / "results.csv")

    with ThreadPoolExecutor(jobs) as pool:
        res = dict(pool.map(one, todo))
    with (out / "valid.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "method", "valid_id_avg", "valid_id_ci95", "valid_sources", "episodes"])
        for r in todo:
            v = res[r["cell"]]
            w.writerow([r["cell"], r["method"], f"{v['id_avg']:.4f}", f"{v['id_ci95']:.4f}", v["id_sources"],
                        v["episodes"]])
    return res


SPARSITY_SLACK = 0.05  # a setting meets its target when every cell's test-gate sparsity is >= tau - this


def choose(rows: List[Dict[str, str]], axes: Sequence[str], out: Path, valid: Dict[str, dict]) -> tuple:
    """The SMAT setting chosen on the valid split, and the table that shows the choice.

    Rule (fixed before the paired valid differences were computed): among the SMAT settings whose cells all meet their
    sparsity target at test time, the highest mean valid ID average over seeds; if the demo's setting
    (configs/demo/smat.yaml) is within the paired 95 % CI of that best one, the demo's setting is kept,
    so a default does not move on episode noise.

    ``valid``: cell -> its :func:`valid_eval` results.
    """
    from smat_dist.config import RunConfig, load_config

    demo = load_config(RunConfig, [REPO / "configs" / "demo" / "smat.yaml"]).model.gates
    done = [r for r in rows if r["status"] == "done" and r["method"].lower() != "pmf"]
    groups = defaultdict(list)
    for r in done:
        groups[setting_key(r, axes)].append(r)
    veps = {r["cell"]: scores(out / "valid" / r["cell"]) for r in done}
    stats = {}
    for key, members in groups.items():
        tau = num(members[0]["tau"])
        meets = all(num(m["sparsity_reached"]) is not None and num(m["sparsity_reached"]) >= tau - SPARSITY_SLACK
                    for m in members)
        v = [valid[m["cell"]]["id_avg"] for m in members]
        stats[key] = dict(members=sorted(members, key=lambda m: int(m["seed"])), meets=meets, valid=sum(v) / len(v),
                          is_demo=(int(members[0]["num_experts"]) == demo.num_experts and tau == demo.target_sparsity))
    eligible = [k for k, st in stats.items() if st["meets"]]
    if not eligible:
        return None, ""
    best = max(eligible, key=lambda k: stats[k]["valid"])
    demo_key = next((k for k in eligible if stats[k]["is_demo"]), None)
    lines = ["| setting | meets τ at test | valid ID avg (mean over seeds) | Δ valid ID vs best (paired) |",
             "|---|---|---|---|"]
    chosen = best
    for key in sorted(stats, key=lambda k: _order(stats[k]["members"][0])):
        st = stats[key]
        d = None
        if key != best:
            mine = {m["seed"]: veps[m["cell"]] for m in st["members"]}
            ref = {m["seed"]: veps[m["cell"]] for m in stats[best]["members"]}
            seeds = sorted(set(mine) & set(ref), key=int)  # seeds matched
            d = paired([mine[x] for x in seeds], [ref[x] for x in seeds],
                       sorted(ref[seeds[0]].acc) if seeds else [])["episodes"]
            if key == demo_key and d is not None and d.hi >= 0:
                chosen = demo_key  # the demo's setting is not worse than the best beyond the CI: keep it
        mark = " **(best)**" if key == best else ""
        lines.append(f"| {_label(st['members'][0], axes)}{mark} | {'yes' if st['meets'] else 'no'} | "
                     f"{st['valid']:.2f} | {'-' if key == best else _pm(d)} |")
    text = "\n".join(lines) + "\n\n" + (
        f"Chosen: **{_label(stats[chosen]['members'][0], axes)}** "
        + ("(the demo's setting, within the CI of the best)" if chosen != best else "(the best)") + ".\n")
    return stats[chosen]["members"][0], text


def valid_eval_avg(dest: Path) -> float:
    from smat_dist.sweep.report import read_eval_results

    return read_eval_results(dest / "results.csv")["id_avg"]


def analyse_cell(cell: Dict[str, str], out: Path, data: Path) -> str:
    dest = out / "analysis"
    if dest.exists():
        shutil.rmtree(dest)
    cmd = [sys.executable, "-m", "smat_dist.eval.cli", "analyse", cell["run_dir"], "--data", str(data), "--out", str(dest)]
    say("smat-eval " + " ".join(cmd[3:]))
    if subprocess.call(cmd, env=env()) != 0:
        raise SystemExit("study: smat-eval analyse failed")
    (dest / "cell.txt").write_text(cell["cell"] + "\n")
    return cell["cell"]


def axis_pairs(done: List[Dict[str, str]], axis: str, within: str):
    """Per value ``w`` of ``within`` (ascending): (w, hi, lo, seeds, {seed: hi cell}, {seed: lo cell}), the cells
    at the largest and smallest value of ``axis`` there and the seeds both have (sweep.csv rows)."""
    for w in sorted({num(r[within]) for r in done}):
        at = [r for r in done if num(r[within]) == w]
        lo, hi = min(num(r[axis]) for r in at), max(num(r[axis]) for r in at)
        by_seed = {v: {r["seed"]: r for r in at if num(r[axis]) == v} for v in (hi, lo)}
        seeds = sorted(set(by_seed[hi]) & set(by_seed[lo]), key=int)  # seeds matched
        yield w, hi, lo, seeds, by_seed[hi], by_seed[lo]


def contrasts(rows: List[Dict[str, str]], axis: str, within: str) -> str:
    """Paired test-episode differences between the largest and smallest value of ``axis`` (sweep.csv column)
    at each value of ``within``, seeds matched: does tau trade ID for OOD, do more experts help?"""
    done = [r for r in rows if r["status"] == "done" and r["method"].lower() != "pmf"]
    eps = {r["cell"]: scores(Path(r["eval_dir"])) for r in done}
    ids, oods = id_ood(per_source(Path(done[0]["eval_dir"])))
    lines = [f"| {within} | {axis}: high − low | Δ ID | Δ OOD | Δ ID (seeds × episodes) | Δ OOD (seeds × episodes) |",
             "|---|---|---|---|---|---|"]
    for w, hi, lo, seeds, high, low in axis_pairs(done, axis, within):
        a, b = [eps[high[x]["cell"]] for x in seeds], [eps[low[x]["cell"]] for x in seeds]
        di, do = paired(a, b, ids), paired(a, b, oods)
        lines.append(f"| {w:g} | {hi:g} − {lo:g} | {_pm(di['episodes'])} | {_pm(do['episodes'])} | "
                     f"{_pm(di['two_level'])} | {_pm(do['two_level'])} |")
    return "\n".join(lines) + "\n"


ATTRIBUTION_CONTRASTS = (  # (a, b, what a − b isolates), by sweep.csv `method`
    ("smat", "pmf-kd-pre", "SMAT's experts, gates, hypernetwork, inner step and teacher, over PMF + distillation to θ_pre"),
    ("smat", "smat-m1-dense", "M = 2 sparse experts and the hypernetwork, over one dense offset with everything else kept"),
    ("smat-no-dt", "smat", "removing the dense teacher"),
    ("smat-no-kd", "smat", "removing all distillation"),
    ("pmf-kd-pre", "pmf", "adding distillation to θ_pre to PMF"),
    ("smat-m1-dense", "pmf-kd-pre", "the inner step and the dense teacher, on one dense offset"),
)


def attribution_contrasts(rows: List[Dict[str, str]]) -> str:
    """Paired differences between the attribution study's variants (same seeds, same test episodes)."""
    done = [r for r in rows if r["status"] == "done"]
    by: Dict[str, Dict[str, Dict[str, str]]] = defaultdict(dict)
    for r in done:
        by[r["method"].lower()][r["seed"]] = r
    lines = [f"| a − b | isolates | seeds | Δ ID | Δ OOD | Δ ID (seeds × episodes) | Δ OOD (seeds × episodes) | "
             f"ID equal within ±{EQUIV_MARGIN:g}? |", "|---|---|---|---|---|---|---|---|"]
    for a, b, what in ATTRIBUTION_CONTRASTS:
        seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})), key=int)
        if not seeds:
            continue
        ids, oods = id_ood(per_source(Path(by[a][seeds[0]]["eval_dir"])))
        mine = [scores(Path(by[a][x]["eval_dir"])) for x in seeds]
        ref = [scores(Path(by[b][x]["eval_dir"])) for x in seeds]
        di, do = paired(mine, ref, ids), paired(mine, ref, oods)
        lines.append(f"| {a} − {b} | {what} | {len(seeds)} | {_pm(di['episodes'])} | {_pm(do['episodes'])} | "
                     f"{_pm(di['two_level'])} | {_pm(do['two_level'])} | {di['equiv'].verdict if di['equiv'] else '-'} |")
    return "\n".join(lines) + "\n"


def long_contrasts(rows: List[Dict[str, str]], docs: Path, *, against: Optional[str] = None,
                   label: str = "{method} (480 − 160 steps)", ref_study: str = "attribution",
                   group: str = "method") -> str:
    """Each cell minus the published cell of the same seed in study ``ref_study`` (its cells under
    ``docs``/``ref_study``; default the attribution study's 160-step cells) and of the same method, or of
    method ``against``; same frozen test episodes (lists checked). Cells are grouped by the sweep.csv
    column ``group`` (``{method}`` in ``label`` is the group's value)."""
    short_dir = docs / ref_study
    if not (short_dir / "sweep.csv").exists():
        return f"(no {short_dir}/sweep.csv: run `python tools/study.py {ref_study}` first)\n"
    short = {(r["method"], r["seed"]): short_dir / "episodes" / r["cell"]
             for r in read_csv(short_dir / "sweep.csv") if r["status"] == "done"}
    by: Dict[str, Dict[str, Path]] = defaultdict(dict)
    method_of: Dict[str, str] = {}
    for r in rows:
        if r["status"] == "done":
            by[r[group]][r["seed"]] = Path(r["eval_dir"])
            method_of[r[group]] = r["method"]
    lines = ["| cells | seeds | Δ ID | Δ OOD | Δ ID (seeds × episodes) | Δ OOD (seeds × episodes) |",
             "|---|---|---|---|---|---|"]
    for key in sorted(by):
        other = against or method_of[key]
        seeds = sorted((s for s in by[key] if (other, s) in short), key=int)
        if not seeds:
            continue
        ids, oods = id_ood(per_source(by[key][seeds[0]]))
        mine = [scores(by[key][x]) for x in seeds]
        ref = [scores(short[(other, x)]) for x in seeds]
        di, do = paired(mine, ref, ids), paired(mine, ref, oods)
        shown = key if group == "method" else f"{num(key):g}"
        lines.append(f"| {label.format(method=shown, other=other)} | {len(seeds)} | {_pm(di['episodes'])} | "
                     f"{_pm(do['episodes'])} | {_pm(di['two_level'])} | {_pm(do['two_level'])} |")
    return "\n".join(lines) + "\n"


def short_tau_contrasts(docs: Path) -> str:
    """τ = 0.95 − τ = 0.8 and − PMF at 160 steps: the outlier study's published cells (M = 2, τ = 0.95)
    against the attribution study's of the same seed, read from ``docs``/outlier/episodes."""
    if not (docs / "outlier" / "sweep.csv").exists():
        return f"(no {docs}/outlier/sweep.csv: run `python tools/study.py outlier` first)\n"
    rows = [dict(r, eval_dir=str(docs / "outlier" / "episodes" / r["cell"]))
            for r in read_csv(docs / "outlier" / "sweep.csv")]
    return (long_contrasts(rows, docs, group="tau", label="160 steps: τ = {method} − τ = 0.8") + "\n"
            + long_contrasts(rows, docs, against="PMF", group="tau", label="160 steps: τ = {method} − {other}"))


def seed_level_table(rows: List[Dict[str, str]], axes: Sequence[str]) -> str:
    """Δ vs PMF per setting with a t-interval over seeds (n − 1 df), from sweep.csv alone: a cell's ID/OOD
    average minus its PMF partner's (same seed and training sources; :func:`reference`) is exactly the mean
    of their paired per-episode differences, so studies published before per-episode files were kept get
    their seed-level intervals too. Training noise is in it; the episodes every seed shares are not."""
    from smat_dist.eval.stats import t_interval

    done = [r for r in rows if r["status"] == "done"]
    pmf = [r for r in done if r["method"].lower() == "pmf"]
    settings: Dict[tuple, List[Dict[str, str]]] = defaultdict(list)
    for r in done:
        if r["method"].lower() != "pmf":
            settings[setting_key(r, axes)].append(r)
    lines = ["| setting | seeds | Δ ID vs PMF (seeds, t) | Δ OOD vs PMF (seeds, t) | resolved | per seed Δ ID / Δ OOD |",
             "|---|---|---|---|---|---|"]
    for key in sorted(settings, key=lambda k: _order(settings[k][0])):
        cells = sorted(settings[key], key=lambda r: int(r["seed"]))
        d_id, d_ood, per = [], [], []
        for r in cells:
            partners = [c for c in pmf if c["seed"] == r["seed"] and c["train_sources"] == r["train_sources"]]
            if not partners:
                continue
            ref = reference(r, partners, axes)
            d_id.append(num(r["id_avg"]) - num(ref["id_avg"]))
            d_ood.append(num(r["ood_avg"]) - num(ref["ood_avg"]))
            per.append(f"s{r['seed']}: {d_id[-1]:+.2f} / {d_ood[-1]:+.2f}")
        if len(d_id) < 2:
            continue
        iid, iood = t_interval(d_id), t_interval(d_ood)
        verdict = ", ".join(name for name, iv in (("ID", iid), ("OOD", iood)) if iv.excludes_zero()) or "neither"
        lines.append(f"| {_label(cells[0], axes)} | {len(d_id)} | {iid} | {iood} | {verdict} | {', '.join(per)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- constraint
CONSTRAINT_MS = (2, 4, 8)
CONSTRAINT_TAUS = (0.5, 0.8, 0.95)
CONSTRAINT_TOL = 0.02  # "reaches τ": every expert's training sparsity within τ ± this at the end
CONSTRAINT_TAIL = 4  # logged rows (log_every 5: the last 20 steps) averaged for the end-of-run sparsity


def constraint_table(runs: Dict[tuple, Path]) -> tuple:
    """(rows, Markdown table) of the training sparsity per expert at the end of each run: the last logged
    row, the mean over the last :data:`CONSTRAINT_TAIL` logged rows, the first step whose every expert is
    within τ ± tol and the step from which it stays within, λ at the end, and the test-gate sparsity. ``runs``: (M, τ) -> run directory."""
    from smat_dist.record import read_rows

    out, lines = [], ["| M | τ | training sparsity per expert, last step | mean of the last 20 steps (min–max over "
                      f"experts) | within τ ± {CONSTRAINT_TOL} | ≥ τ − {CONSTRAINT_TOL} | first step within | within from step | "
                      "λ at the end (max) | test-gate sparsity (mean) | expected training sparsity | test sparsity, β_test = β |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (M, tau), run in sorted(runs.items()):
        mr = [r for r in read_rows(run / "metrics.jsonl") if r.get("sparsity")]
        last = mr[-1]["sparsity"]
        tail = [sum(c) / len(c) for c in zip(*(r["sparsity"] for r in mr[-CONSTRAINT_TAIL:]))]
        ok = all(abs(v - tau) <= CONSTRAINT_TOL for v in tail)
        at_least = all(v >= tau - CONSTRAINT_TOL for v in tail)
        inside = [all(abs(v - tau) <= CONSTRAINT_TOL for v in r["sparsity"]) for r in mr]
        first = next((r["step"] for r, yes in zip(mr, inside) if yes), None)
        # settled: the first logged step from which every later logged step is within too
        settled = None
        for r, yes in zip(reversed(mr), reversed(inside)):
            if not yes:
                break
            settled = r["step"]
        tested = [r for r in mr if r.get("sparsity_test")]  # measured at logged steps only
        gs = gate_logit_stats(run) if (run / "model.safetensors").exists() else None
        row = dict(M=M, tau=tau, last=last, tail=tail, within=ok, at_least=at_least, first_step=first,
                   settled_step=settled, lam=max(mr[-1]["lambda"]),
                   test=sum(tested[-1]["sparsity_test"]) / M, steps=mr[-1]["step"],
                   expected=None if gs is None else sum(gs["expected"]) / M,
                   test_at_beta=None if gs is None else sum(gs["test_at_beta"]) / M)
        out.append(row)
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {M} | {tau:g} | {' '.join(f'{v:.3f}' for v in last)} | {sum(tail) / M:.3f} "
                     f"({min(tail):.3f}–{max(tail):.3f}) | {'yes' if ok else '**no**'} | {'yes' if at_least else '**no**'} | "
                     f"{first if first is not None else 'never'} | {settled if settled is not None else 'never'} | "
                     f"{row['lam']:.3f} | {row['test']:.3f} | "
                     f"{fmt(row['expected'])} | {fmt(row['test_at_beta'])} |")
    return out, "\n".join(lines) + "\n"


def gate_logit_stats(run: Path) -> Optional[dict]:
    """From a run's export: per expert, the expected training sparsity mean_g Q(0; φ_g) and the test-gate
    sparsity at the run's ``test_beta`` and at the training β (unstructured gates only; else None).

    A test gate is 0 iff φ ≤ β_test·logit(p0), p0 = −γ/(ζ−γ); a training draw is 0 with probability
    Q(0; φ) = sigmoid(β·log(−γ/ζ) − φ), which is ½ exactly at β·logit(p0): with ``test_beta`` = β the
    test gates close the gates that training closes more often than not."""
    import torch

    from smat_dist.export import read_export

    tensors, meta = read_export(run / "model.safetensors")
    g = json.loads(meta["model_config"])["gates"]
    if g.get("structured"):
        return None
    phi = tensors["gates.logits"].double()
    p0 = -g["gamma"] / (g["zeta"] - g["gamma"])
    threshold = math.log(p0 / (1 - p0))
    return dict(phi=phi, beta=g["beta"], test_beta=g["test_beta"], threshold=threshold,
                expected=torch.sigmoid(g["beta"] * math.log(-g["gamma"] / g["zeta"]) - phi).mean(1).tolist(),
                test_at_test_beta=(phi <= g["test_beta"] * threshold).double().mean(1).tolist(),
                test_at_beta=(phi <= g["beta"] * threshold).double().mean(1).tolist())


def plot_gate_logits(stats: Dict[tuple, dict], path: Path) -> Optional[Path]:
    """Histogram of the gate logits of each run (experts pooled), one panel per τ and a line per M, with
    the two test thresholds: β_test = 1 (default) and β_test = β (= the training draw's median)."""
    from smat_dist.plotting import pyplot, save

    plt = pyplot()
    taus = sorted({tau for _, tau in stats})
    if plt is None or not taus:
        return None
    fig, axes = plt.subplots(1, len(taus), figsize=(4.2 * len(taus), 3.2), squeeze=False)
    colours = {M: f"C{i}" for i, M in enumerate(sorted({M for M, _ in stats}))}
    for ax, tau in zip(axes[0], taus):
        here = [(M, st) for (M, t), st in sorted(stats.items()) if t == tau]
        for M, st in here:
            phi = st["phi"].flatten().clamp(-12, 12).float().numpy()
            ax.hist(phi, bins=120, range=(-12, 12), histtype="step", density=True, color=colours[M], label=f"M = {M}")
        st = here[0][1]
        ax.axvline(st["test_beta"] * st["threshold"], color="k", ls="--", lw=1,
                   label=f"test gate 0 left of here (β_test = {st['test_beta']:g})")
        ax.axvline(st["beta"] * st["threshold"], color="r", ls=":", lw=1,
                   label=f"β_test = β = {st['beta']:.3g}: P(training z = 0) = ½")
        ax.set_title(f"τ = {tau:g}")
        ax.set_xlabel("gate logit φ (clipped to ±12 for the plot)")
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper right")
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    return save(fig, path)


def constraint_study(a) -> int:
    """M × τ short single-process runs of configs/demo/smat.yaml (training metrics only, no evaluation):
    does every expert reach τ within the demo's run? Publishes docs/results/constraint/."""
    inputs = demo_inputs()
    out = (Path(a.out) if a.out else REPO / "runs" / "constraint").resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    t0 = time.time()
    for M in a.experts or CONSTRAINT_MS:
        for tau in a.tau or CONSTRAINT_TAUS:
            name = f"m{M}_tau{tau:g}"
            run = out / name
            runs[(M, tau)] = run
            if (run / "model.safetensors").exists() or a.publish_only:
                continue
            cmd = [sys.executable, "-m", "smat_dist.train", "--config", str(REPO / "configs" / "demo" / "smat.yaml"),
                   f"model.gates.num_experts={M}", f"model.gates.target_sparsity={tau}", "dist.num_workers=1",
                   f"data.root={inputs['data']}", f"model.backbone.checkpoint={inputs['backbone']}",
                   f"train.output_dir={out}", f"train.run_name={name}", *a.set]
            if a.lock:  # each run holds a shared lock alone, so other heavy jobs can run between them
                cmd = ["flock", a.lock, *cmd]
            say(" ".join(cmd[cmd.index("-m") + 1:]))
            with (out / f"{name}.log").open("w") as f:
                if subprocess.call(cmd, env=env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT) != 0:
                    raise SystemExit(f"study: run {name} failed (see {f.name}); re-run to resume")
    publish_constraint(runs, out, a.docs / (a.name or "constraint"), a.set)
    say(f"constraint: done in {(time.time() - t0) / 60:.1f} min")
    return 0


def publish_constraint(runs: Dict[tuple, Path], out: Path, dest: Path, sets: Sequence[str] = ()) -> str:
    """summary.md (in ``out`` and ``dest``) and constraint.csv (``dest``) of the finished runs among ``runs``."""
    runs = {k: v for k, v in runs.items() if (v / "metrics.jsonl").exists() and (v / "model.safetensors").exists()}
    rows, table = constraint_table(runs)
    dest.mkdir(parents=True, exist_ok=True)
    stats = {k: st for k, run in runs.items() if (st := gate_logit_stats(run)) is not None}
    figure = plot_gate_logits(stats, dest / "gate_logits.png")
    met = sum(r["within"] for r in rows)
    met_low = sum(r["at_least"] for r in rows)
    text = ("# constraint: does every expert reach τ within the demo's run?\n\n"
            "Generated by `python tools/study.py constraint`: `configs/demo/smat.yaml` (160 meta-steps × 4 tasks, "
            "seed 0, one process) for M × τ" + (f", with `{' '.join(sets)}`" if sets else "") + ". Training "
            "sparsity = the fraction of exactly-zero gates in the step's noisy draw (metrics.jsonl `sparsity`), "
            f"per expert. {met} of {len(rows)} runs end with every expert within τ ± {CONSTRAINT_TOL}, "
            f"{met_low} with every expert at least τ − {CONSTRAINT_TOL} (mean of the last 20 steps).\n\n" + table
            + "\nFrom each export: the expected training sparsity mean_g Q(0; φ_g) (the draw's mean), and the "
            "test-gate sparsity if the test gates used the training β instead of `test_beta` = 1 (then a test "
            "gate is 0 exactly where a training draw is 0 with probability > ½)."
            + ("\n\n![gate logits](gate_logits.png)\n" if figure else "\n"))
    (out / "summary.md").write_text(text)
    (dest / "summary.md").write_text(text)
    with (dest / "constraint.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["num_experts", "tau", "sparsity_last", "sparsity_tail_mean", "within_tol", "at_least_tau_minus_tol",
                    "first_step_within",
                    "lambda_max_end", "sparsity_test_mean", "steps", "expected_sparsity_mean",
                    "sparsity_test_at_beta_mean"])
        for r in rows:
            w.writerow([r["M"], r["tau"], " ".join(f"{v:.4f}" for v in r["last"]),
                        " ".join(f"{v:.4f}" for v in r["tail"]), int(r["within"]), int(r["at_least"]),
                        r["first_step"] or "",
                        f"{r['lam']:.4f}", f"{r['test']:.4f}", r["steps"],
                        "" if r["expected"] is None else f"{r['expected']:.4f}",
                        "" if r["test_at_beta"] is None else f"{r['test_at_beta']:.4f}"])
    say(f"constraint: {len(rows)} finished runs published to {dest}")
    print(text)
    return text


SPECIALISATION_EPISODES = 100  # frozen test episodes per source whose α is read
SPECIALISATION_CONDITIONS = (  # (name, hypernetwork re-initialised, selection temperature at the run's start)
    ("trained", False, False),
    ("temperature only", True, False),  # an untrained hypernetwork at the trained run's final temperature
    ("untrained", True, True),  # the run's model before its first step: untrained, temperature at its start
)


def null_export(export: Path, dest: Path, *, seed: int, fresh: bool, at_start: bool) -> Path:
    """The run's export with its hypernetwork re-initialised (seeded per run) and/or its task counter at 0
    (the selection temperature at its start): the nulls α specialisation is measured against."""
    import torch

    from smat_dist.export import export_model, load_model, train_config_of
    from smat_dist.smat.hypernet import Hypernetwork

    model = load_model(export)
    if fresh:
        torch.manual_seed(10_000 + seed)
        model.hypernet.load_state_dict(Hypernetwork(model.dim, model.num_experts, model.cfg.hypernet).state_dict())
    if at_start:
        model.tasks_seen.zero_()
    return export_model(model, dest, train_config_of(export))


def _seed_mean(vals: List[float], *, signed: bool) -> str:
    """Mean ± 95 % t half-width over seeds (the mean alone for one seed)."""
    from smat_dist.eval.stats import t_interval

    fmt = "+.3f" if signed else ".3f"
    if len(vals) < 2:
        return f"{vals[0]:{fmt}}"
    iv = t_interval(vals)
    return f"{iv.mean:{fmt}} ± {iv.half:.3f}"


def specialisation_table(measured: Dict[str, Dict[str, dict]]) -> str:
    """Per condition: each metric's mean over seeds ± t-interval; then trained − null, paired by seed."""
    seeds = sorted(measured)
    names = [c for c, _, _ in SPECIALISATION_CONDITIONS]
    metrics = (("eta2", "η² (between-source share of α variance)"), ("decode", "source decoded from α"),
               ("spread", "largest source-mean gap"), ("entropy", "α entropy / log M"))
    lines = ["| α from | " + " | ".join(label for _, label in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for c in names:
        cells = []
        for key, _ in metrics:
            cells.append(_seed_mean([measured[s][c][key] for s in seeds], signed=False))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    chance = measured[seeds[0]][names[0]]["chance"]
    lines += ["", f"Chance for decoding: {chance:.3f}. Paired by seed (trained − null, mean ± 95 % t-interval over "
              f"{len(seeds)} seeds):", "", "| contrast | " + " | ".join(k for k, _ in metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
    for null in names[1:]:
        cells = []
        for key, _ in metrics:
            cells.append(_seed_mean([measured[s]["trained"][key] - measured[s][null][key] for s in seeds], signed=True))
        lines.append(f"| trained − {null} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_level_contrasts(rows: List[Dict[str, str]], axis: str, within: str) -> str:
    """:func:`contrasts` from sweep.csv alone: per seed, the ``axis``-high cell's ID / OOD average minus the
    ``axis``-low one's at each value of ``within``, with a t-interval over the seeds."""
    from smat_dist.eval.stats import t_interval

    done = [r for r in rows if r["status"] == "done" and r["method"].lower() != "pmf"]
    lines = [f"| {within} | {axis}: high − low | seeds | Δ ID (seeds, t) | Δ OOD (seeds, t) | per seed Δ ID / Δ OOD |",
             "|---|---|---|---|---|---|"]
    for w, hi, lo, seeds, high, low in axis_pairs(done, axis, within):
        if len(seeds) < 2:
            continue
        d_id = [num(high[x]["id_avg"]) - num(low[x]["id_avg"]) for x in seeds]
        d_ood = [num(high[x]["ood_avg"]) - num(low[x]["ood_avg"]) for x in seeds]
        per = ", ".join(f"s{x}: {i:+.2f} / {o:+.2f}" for x, i, o in zip(seeds, d_id, d_ood))
        lines.append(f"| {w:g} | {hi:g} − {lo:g} | {len(seeds)} | {t_interval(d_id)} | {t_interval(d_ood)} | {per} |")
    return "\n".join(lines) + "\n"


def seed_level_study(a) -> int:
    """docs/results/<study>/seed_level.md for the published tradeoff and sources studies (no cell is run)."""
    from smat_dist.sweep.config import load_sweep_config

    for study in ("tradeoff", "sources"):
        published = a.docs / study / "sweep.csv"
        if not published.exists():
            say(f"seedlevel: no {published}; skipped")
            continue
        axes = list(load_sweep_config(SWEEPS / f"toy_{study}.yaml").axes)
        text = (f"# {study}: Δ vs PMF with seed-level intervals\n\nGenerated by `python tools/study.py seedlevel` from "
                f"this directory's `sweep.csv`: per setting, each seed's ID / OOD average minus PMF's of the same seed "
                "and training sources (the mean of their paired per-episode differences), and the 95 % t-interval "
                "over seeds (n − 1 degrees of freedom). It includes training noise; the test episodes, shared by "
                "every seed, are not resampled. *resolved*: the interval excludes 0.\n\n"
                + seed_level_table(read_csv(published), axes))
        if study == "tradeoff":
            rows = read_csv(published)
            text += ("\n## Contrasts between settings, seed level\n\nThe same for the paired contrasts of "
                     "summary.md: per seed, one setting's average minus the other's.\n\n"
                     + seed_level_contrasts(rows, "tau", "num_experts") + "\n"
                     + seed_level_contrasts(rows, "num_experts", "tau"))
        (a.docs / study / "seed_level.md").write_text(text)
        say(f"seedlevel: wrote {a.docs / study / 'seed_level.md'}")
        print(text)
    return 0


def specialisation_study(a) -> int:
    """Does the trained hypernetwork's α specialise by source beyond what an untrained one gives, at the
    trained temperature (temperature only) or at the start of the run (untrained)? M = 4, τ = 0.8, the
    demo's run otherwise, one cell per seed (toy_specialisation.yaml); α of 100 test episodes per source."""
    from smat_dist.eval.analyse import alpha_specialisation, source_alphas
    from smat_dist.eval.config import AnalyseConfig, EvalConfig
    from smat_dist.eval.models import resolve_export

    config = SWEEPS / "toy_specialisation.yaml"
    out = sweep_dir(config)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    inputs = demo_inputs()
    sweep_s = run_sweep(config, inputs, num_cpus=a.num_cpus)
    rows = [r for r in read_csv(out / "sweep.csv") if r["status"] == "done"]
    cfg = EvalConfig(analyse=AnalyseConfig(episodes_per_source=SPECIALISATION_EPISODES), threads=a.num_cpus)
    measured: Dict[str, Dict[str, dict]] = {}
    per_source: List[dict] = []
    for r in rows:
        export = resolve_export(r["run_dir"])
        seed = int(r["seed"])
        measured[r["seed"]] = {}
        for name, fresh, at_start in SPECIALISATION_CONDITIONS:
            model = export if not fresh and not at_start else null_export(
                export, out / "nulls" / r["cell"] / f"{name.replace(' ', '_')}.safetensors", seed=seed, fresh=fresh,
                at_start=at_start)
            sources, alphas, kinds = source_alphas(model, str(inputs["data"]), cfg, out / "alpha")
            measured[r["seed"]][name] = alpha_specialisation(alphas)
            for s in sources:
                per_source.append({"seed": seed, "condition": name, "source": s, "kind": kinds[s],
                                   **{f"alpha_{m}": f"{v:.4f}" for m, v in enumerate(alphas[s].mean(0))}})
            say(f"specialisation: seed {seed}, {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                       measured[r['seed']][name].items()))
    text = ("# specialisation: does α select experts by source beyond an untrained hypernetwork?\n\n"
            f"Generated by `python tools/study.py specialisation`: `configs/demo/smat.yaml` with M = 4, τ = 0.8 "
            f"(`configs/sweeps/toy_specialisation.yaml`), {len(rows)} seeds; α of the first "
            f"{SPECIALISATION_EPISODES} frozen test episodes of every source (ID and OOD), from the trained model, "
            "from the same model with its hypernetwork re-initialised at the trained run's final selection "
            "temperature (*temperature only*), and with the temperature also at its start (*untrained*: the "
            "model before its first step). Metrics: `smat_dist.eval.analyse.alpha_specialisation`.\n\n"
            + specialisation_table(measured)
            + "\n## Accuracy against PMF\n\nEach cell minus the attribution study's PMF cell of the same seed "
              "(docs/results/attribution), same test episodes; Δ ± 95 % CI over episodes (seeds averaged per "
              "episode), and over seeds × episodes.\n\n"
            + long_contrasts(rows, a.docs, against="PMF", label="{method} M=4 τ=0.8 − {other}"))
    (out / "summary.md").write_text(text)
    dest = a.docs / "specialisation"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for r in rows:  # per-episode accuracies and episode-list hashes of every cell
        cell_dest = dest / "episodes" / r["cell"]
        cell_dest.mkdir(parents=True)
        for name in ("results.csv", "episodes.csv"):
            if (Path(r["eval_dir"]) / name).exists():
                (cell_dest / name).write_text((Path(r["eval_dir"]) / name).read_text().replace(f"{REPO}{os.sep}", ""))
    (dest / "summary.md").write_text(text)
    for name in ("sweep.csv",):
        (dest / name).write_text((out / name).read_text().replace(f"{REPO}{os.sep}", ""))
    with (dest / "alpha_by_source.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(per_source[0]))
        w.writeheader()
        w.writerows(per_source)
    with (dest / "specialisation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "condition", "eta2", "decode", "chance", "spread", "entropy"])
        for seed in sorted(measured):
            for name, vals in measured[seed].items():
                w.writerow([seed, name, *(f"{vals[k]:.4f}" for k in ("eta2", "decode", "chance", "spread", "entropy"))])
    say(f"specialisation: {len(rows)} cells in {(time.time() - t0) / 60:.1f} min (sweep {sweep_s / 60:.1f} min); "
        f"published to {dest}")
    print(text)
    return 0


# ----------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/study.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=["select", "tradeoff", "sources", "attribution", "long", "long_tau", "outlier",
                                      "constraint", "specialisation", "seedlevel"])
    ap.add_argument("--fresh", action="store_true", help="delete the sweep's directory first (from scratch)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the sweep's local Ray")
    ap.add_argument("--docs", type=Path, default=DOCS, help="where the published results go")
    ap.add_argument("--demo-out", help="where the demo's benchmark and θ_pre are made or reused (default runs/demo)")
    ap.add_argument("--out", help="constraint: the runs' directory (default runs/constraint)")
    ap.add_argument("--name", help="constraint: publish to docs/results/NAME (default constraint)")
    ap.add_argument("--publish-only", action="store_true", help="constraint: publish the finished runs, start none")
    ap.add_argument("--lock", help="constraint: run each training under `flock LOCK` (a shared machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="constraint: an extra run-config override for every run (repeatable)")
    ap.add_argument("--experts", type=int, nargs="+", help=f"constraint: values of M (default {CONSTRAINT_MS})")
    ap.add_argument("--tau", type=float, nargs="+", help=f"constraint: values of τ (default {CONSTRAINT_TAUS})")
    a = ap.parse_args(argv)
    global DEMO_OUT
    if a.demo_out:
        DEMO_OUT = Path(a.demo_out).resolve()
    if a.study == "constraint":
        return constraint_study(a)
    if a.study == "specialisation":
        return specialisation_study(a)
    if a.study == "seedlevel":
        return seed_level_study(a)
    from smat_dist.sweep.config import load_sweep_config

    config = SWEEPS / f"toy_{a.study}.yaml"
    axes = list(load_sweep_config(config).axes)
    out = sweep_dir(config)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    timing: Dict[str, float] = {}
    t0 = time.time()
    inputs = demo_inputs()
    timing["inputs_s"] = time.time() - t0
    timing["sweep_s"] = run_sweep(config, inputs, num_cpus=a.num_cpus)
    rows = read_csv(out / "sweep.csv")
    valid: Dict[str, dict] = {}
    best = None
    choice = ""
    if a.study == "tradeoff":
        t1 = time.time()
        valid = valid_eval(rows, out, inputs["data"], jobs=a.num_cpus)
        timing["valid_s"] = time.time() - t1
        t1 = time.time()
        chosen, choice = choose(rows, axes, out, valid)
        if chosen is not None:
            best = analyse_cell(chosen, out, inputs["data"])
        timing["analyse_s"] = time.time() - t1
    elif a.study == "select":
        valid = {r["cell"]: {"id_avg": num(r["id_avg"])} for r in rows if r["status"] == "done"}
    t1 = time.time()
    pre = None if a.study == "select" else \
        pre_eval(rows, out, inputs["data"], ["test", "valid"] if a.study == "tradeoff" else ["test"])
    timing["pre_s"] = time.time() - t1
    text, deltas = summarise(out, rows, axes, valid if a.study == "tradeoff" else {},
                     split="valid (the ID sources' valid classes; no OOD source has one)" if a.study == "select" else "test",
                     pre=pre)
    if a.study == "tradeoff":
        text += ("\n## Paired contrasts\n\nSame seeds, same test episodes; Δ ± 95 % CI over episodes (seeds "
                 "averaged per episode), and over seeds × episodes.\n\n" + contrasts(rows, "tau", "num_experts") + "\n"
                 + contrasts(rows, "num_experts", "tau"))
        text += ("\n## The SMAT setting chosen on the valid split\n\n" + (choose.__doc__ or "").split("\n\n")[1]
                 .replace("\n    ", " ").strip() + f" Sparsity target met: test sparsity >= τ − {SPARSITY_SLACK}.\n\n"
                 + choice + (f"\nAnalysed (`smat-eval analyse`, figures in analysis/): `{best}`.\n" if best else ""))
    if a.study == "attribution":
        text += ("\n## Contrasts between the variants\n\nSame seeds, same test episodes; Δ ± 95 % CI over episodes "
                 "(seeds averaged per episode), and over seeds × episodes.\n\n" + attribution_contrasts(rows))
    if a.study == "long":
        text += ("\n## Against the 160-step runs\n\nEach cell minus the attribution study's cell of the same method "
                 "and seed (docs/results/attribution), same test episodes; Δ ± 95 % CI over episodes (seeds averaged "
                 "per episode), and over seeds × episodes.\n\n" + long_contrasts(rows, a.docs))
    if a.study == "long_tau":
        text += ("\n## Against τ = 0.8 and PMF at the same length\n\nEach cell minus the long study's cell of the "
                 "same seed (docs/results/long: SMAT M = 2 τ = 0.8, and PMF, 480 steps), same test episodes; Δ ± 95 % "
                 "CI over episodes (seeds averaged per episode), and over seeds × episodes.\n\n"
                 + long_contrasts(rows, a.docs, ref_study="long", group="tau", label="τ = {method} − τ = 0.8")
                 + "\n" + long_contrasts(rows, a.docs, against="PMF", ref_study="long", group="tau",
                                         label="τ = {method} − {other}"))
        text += ("\nThe same contrasts at 160 steps, from published cells on this code: the outlier study's "
                 "τ = 0.95 cells minus the attribution study's SMAT (τ = 0.8) and PMF cells of the same seed.\n\n"
                 + short_tau_contrasts(a.docs))
    if a.study == "outlier":
        text += ("\n## Against PMF\n\nEach cell minus the attribution study's PMF cell of the same seed "
                 "(docs/results/attribution), same test episodes; Δ ± 95 % CI over episodes (seeds averaged per "
                 "episode), and over seeds × episodes.\n\n"
                 + long_contrasts(rows, a.docs, against="PMF", label="{method} M=2 τ=0.95 − {other}"))
    if a.study in ("select", "tradeoff", "attribution", "long", "long_tau", "outlier"):
        text += ("\n## Diagnostics\n\nPer cell, from metrics.jsonl and the exported model: the first step whose "
                 "training gates of every expert reach τ (within 0.01), the test-gate sparsity at the end, the largest λ, the mean "
                 "α entropy over the last quarter of the run relative to uniform (1 = no selection), the largest "
                 "difference between two sources' mean α for one expert over that quarter, how far the merged "
                 "weights are from θ_pre (L2, uniform α; PMF: its offset), and the training-task query accuracy "
                 "minus θ_pre's ProtoNet accuracy on the same tasks over the last quarter.\n\n")
        text += diagnose(rows, axes)
    (out / "summary.md").write_text(text)
    if a.study == "sources":
        plot_source_deltas(deltas, out / "sources_delta.png")
    if a.study == "outlier":
        plot_cell_curves(rows, out / "curves.png", "SMAT M = 2, τ = 0.95 on this code, per seed")
    timing["total_s"] = time.time() - t0

    dest = a.docs / a.study
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    figures = {"select": (), "tradeoff": ("tradeoff.png",), "sources": ("scaling.png", "sources_delta.png"),
               "attribution": (), "long": (), "long_tau": (), "outlier": ("curves.png",)}[a.study]
    for name in ("sweep.csv", "valid.csv", "summary.md", *figures):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)
    if best:
        (dest / "analysis").mkdir()
        for p in sorted((out / "analysis").iterdir()):
            if p.suffix in (".png", ".json", ".txt"):
                shutil.copy2(p, dest / "analysis" / p.name)
    # every cell's per-episode accuracies and episode-list hashes, so each paired number can be recomputed
    for r in rows:
        if r["status"] == "done" and r.get("eval_dir"):
            cell_dest = dest / "episodes" / r["cell"]
            cell_dest.mkdir(parents=True)
            for name in ("results.csv", "episodes.csv"):
                if (Path(r["eval_dir"]) / name).exists():
                    shutil.copy2(Path(r["eval_dir"]) / name, cell_dest / name)
    # paths as paths inside the repository, not this machine's checkout
    for p in [dest / "sweep.csv", *(dest / "analysis").glob("*.json"), *(dest / "episodes").glob("*/results.csv")]:
        if p.exists():
            p.write_text(p.read_text().replace(f"{REPO}{os.sep}", ""))
    cells = [json.loads((out / "cells" / f"{r['cell']}.json").read_text()) for r in rows
             if (out / "cells" / f"{r['cell']}.json").exists()]
    timing["cell_train_s"] = sum(c.get("train_s") or 0 for c in cells)
    timing["cell_eval_s"] = sum(c.get("eval_s") or 0 for c in cells)
    # wall time with at least one cell running, over every invocation of the sweep (a resumed or extended
    # sweep's cells were run by earlier calls, whose own sweep_s this call does not see)
    spans = sorted((x["started"], x["ended"]) for c in cells for x in c.get("attempts", []) if x.get("ended"))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    timing["cells_wall_s"] = busy
    # every invocation's timing, oldest first (a re-run that finds the cells done takes a minute, the first one
    # an hour: both are kept)
    history = out / "study_runs.jsonl"
    with history.open("a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), **{k: round(v, 1) for k, v in timing.items()}})
                + "\n")
    shutil.copy2(history, dest / "timing.jsonl")
    say(f"{a.study}: {len(rows)} cells in {timing['total_s'] / 60:.1f} min (sweep {timing['sweep_s'] / 60:.1f} min); "
        f"published to {dest}")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
