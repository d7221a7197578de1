"""``evaluate()``: meta-test one model on frozen episodes of every source, in every mode.

Plan of a run:

1. the model recipe (an export, or the Pre baseline) and its image size; the sources (every source
   with a test split unless ``sources`` is set), each tagged ID (meta-trained on) or OOD;
2. one frozen episode list per source (cached, sha256 recorded);
3. optional HPS per (source, fine-tuning mode) on a few episodes that are not scored;
4. every episode scored in every mode by the worker pool; accuracies re-ordered by episode;
5. mean, 95% CI (1.96·s/√n), per-episode rows and the Table-1 layout, written to ``out``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from smat_dist.config import to_yaml
from smat_dist.data.store import Catalog, DataError
from smat_dist.errors import ConfigError
from smat_dist.eval.config import EvalConfig
from smat_dist.eval.episodes import FrozenList, frozen_list, writable_episodes_dir
from smat_dist.eval.models import ModelSpec, column_label, describe_checkpoint, describe_pre
from smat_dist.eval.pool import make_pool
from smat_dist.eval.report import ResultRow, markdown_table, write_episodes, write_results
from smat_dist.eval.stats import mean_ci95
from smat_dist.eval.worker import EpisodeResult, Job

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """What :func:`evaluate` returns (and, with ``out``, writes)."""

    rows: List[ResultRow]  # one per source × mode
    accuracies: Dict[Tuple[str, str], np.ndarray]  # (source, column label) -> per-episode accuracy in %, list order
    episodes: List[EpisodeResult]  # per scored episode, list order within each source
    lists: Dict[str, FrozenList]
    table: str  # Markdown, Table-1 layout
    label: str
    seconds: float
    episodes_per_s: float  # scored episodes (all modes of one episode count once) per wall second
    lrs: Dict[Tuple[str, str], float] = field(default_factory=dict)  # (source, mode) -> lr used
    files: Dict[str, Path] = field(default_factory=dict)
    worker_info: List[Dict[str, object]] = field(default_factory=list)
    worker_stats: Dict[str, float] = field(default_factory=dict)


class Progress:
    """A line every ``every_s`` seconds (log-friendly, unlike a redrawn bar)."""

    def __init__(self, total: int, every_s: float, what: str, stream=None):
        self.total, self.every_s, self.what = total, every_s, what
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr

    def update(self, n: int, detail: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.every_s >= 0 and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            rate = self.done / max(1e-9, now - self.t0)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[smat-eval] {self.what} {self.done}/{self.total} ({100.0 * self.done / max(1, self.total):.0f}%) "
                  f"{rate:.1f} ep/s, eta {eta:.0f} s {detail}".rstrip(), file=self.stream, flush=True)


def model_spec_for(cfg: EvalConfig, checkpoint: Optional[str], method: str) -> ModelSpec:
    if method == "pre":
        return describe_pre(checkpoint, cfg.model.backbone)
    if method != "model":
        raise ConfigError(f"--method must be 'model' (the checkpoint's own) or 'pre', got {method!r}")
    if not checkpoint:
        raise ConfigError("--checkpoint RUN_OR_FILE is required (or --method pre with a backbone)")
    return describe_checkpoint(checkpoint)


def _sources(cfg: EvalConfig, catalog: Catalog) -> List[str]:
    have = catalog.sources()
    if not have:
        raise DataError(f"no source (*/manifest.json) under {catalog.root}")
    if cfg.sources:
        for s in cfg.sources:
            if s not in have:
                raise DataError(f"sources: {s!r} not found under {catalog.root} (have {have})")
            if cfg.split not in catalog.store(s).splits():
                raise DataError(f"sources: {s!r} has no {cfg.split!r} split (has {catalog.store(s).splits()})")
        return list(cfg.sources)
    out = catalog.sources_with(cfg.split)
    if not out:
        raise DataError(f"no source under {catalog.root} has a {cfg.split!r} split")
    return out


def _id_sources(cfg: EvalConfig, spec: ModelSpec, catalog: Catalog) -> List[str]:
    """ID = meta-trained on: the run's data.train_sources (empty there = every source with train
    classes), for every method: Pre of a run carries the run's list. ``id_sources`` overrides."""
    if cfg.id_sources is not None:
        return list(cfg.id_sources)
    if spec.train_sources:
        return list(spec.train_sources)
    return catalog.sources_with("train")


def _data_config(cfg: EvalConfig, spec: ModelSpec):
    data = dataclasses.replace(cfg.data, image_size=spec.img_size)
    data.validate()
    return data


def pick_lr(grid: Sequence[float], accuracies: Sequence[float]) -> float:
    """The grid value with the strictly highest accuracy; ties keep the earlier one (as the published code)."""
    best = 0
    for j in range(1, len(grid)):
        if accuracies[j] > accuracies[best]:
            best = j
    return float(grid[best])


def _hps(pool, cfg: EvalConfig, data, catalog: Catalog, sources: List[str], directory: Path,
         ft_modes: List[str], say) -> Tuple[Dict[Tuple[str, str], float], Dict[str, str]]:
    """lr per (source, mode): the grid value with the strictly best mean accuracy on HPS episodes
    (ties keep the earlier, smaller lr; 0 = no fine-tuning), as the published code's ``--hps``."""
    h = cfg.hps
    grid = [float(v) for v in h.grid]
    chosen: Dict[Tuple[str, str], float] = {}
    used: Dict[str, str] = {}
    jobs: List[Job] = []
    for s in sources:
        if h.split in catalog.store(s).splits() and h.split != cfg.split:
            fl = frozen_list(data, s, h.split, h.episodes, cfg.seed, directory)
            used[s] = h.split
        elif h.fallback == "test" or h.split == cfg.split:
            # Episodes after the scored ones: same classes, never the scored tasks (the published
            # code draws its search tasks from a fresh pass over the test loader).
            fl = frozen_list(data, s, cfg.split, h.episodes, cfg.seed, directory, start=cfg.episodes)
            used[s] = cfg.split
        else:
            used[s] = "default"
            continue
        runs = [(m, cfg.finetune.lr_for(m, lr)) for m in ft_modes for lr in grid]
        jobs += [Job(sp, runs, h.max_support_per_class) for sp in fl.specs]
    if jobs:
        prog = Progress(len(jobs), cfg.progress_every_s, "hps")
        acc: Dict[str, Dict[int, List[float]]] = {}
        chunks = [jobs[i:i + 1] for i in range(len(jobs))]
        for _, results in pool.map(chunks):
            for r in results:
                acc.setdefault(r.source, {})[r.index] = r.accuracy
            prog.update(len(results))
        for s in sources:
            if s not in acc:
                continue
            rows = [acc[s][i] for i in sorted(acc[s])]  # episode order: arrival order never matters
            mean = np.mean(np.asarray(rows), axis=0)
            for mi, m in enumerate(ft_modes):
                vals = mean[mi * len(grid):(mi + 1) * len(grid)]
                chosen[(s, m)] = cfg.finetune.lr_for(m, pick_lr(grid, vals))
                say(f"[smat-eval] hps {s} {m}: lr {chosen[(s, m)]:g} "
                    f"(grid accuracies {', '.join(f'{100 * v:.1f}' for v in vals)}; {used[s]} split)")
    return chosen, used


def evaluate(cfg: EvalConfig, checkpoint: Optional[str] = None, method: str = "model", label: Optional[str] = None,
             out: Optional[str | Path] = None, say: Callable[[str], None] = None) -> EvalReport:
    """Meta-test a model; see the module docstring. ``method='pre'`` = the pre-trained ProtoNet."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    spec = model_spec_for(cfg, checkpoint, method)
    base = label or spec.label
    data = _data_config(cfg, spec)
    cfg = dataclasses.replace(cfg, data=data)  # workers read images at the model's resolution
    catalog = Catalog.for_config(data)
    sources = _sources(cfg, catalog)
    id_set = set(_id_sources(cfg, spec, catalog))
    kind = {s: ("ID" if s in id_set else "OOD") for s in sources}
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    ep_dir = writable_episodes_dir(cfg.episodes_dir, data.root, (out_dir or Path(".")) / "episodes")
    lists = {s: frozen_list(data, s, cfg.split, cfg.episodes, cfg.seed, ep_dir) for s in sources}
    for s, fl in lists.items():
        say(f"[smat-eval] {s} ({kind[s]}): {cfg.episodes} {cfg.split} episodes from {fl.path} (sha256 {fl.sha256[:12]})")

    ft_modes = [m for m in cfg.modes if m != "none"]
    pool = make_pool(spec, cfg)
    try:
        lrs: Dict[Tuple[str, str], float] = {}
        hps_used: Dict[str, str] = {}
        if cfg.hps.enabled and ft_modes and cfg.finetune.steps > 0:
            lrs, hps_used = _hps(pool, cfg, data, catalog, sources, ep_dir, ft_modes, say)
        for s in sources:
            for m in ft_modes:
                lrs.setdefault((s, m), cfg.finetune.lr_for(m))
        jobs: List[Job] = []
        for s in sources:
            runs = [(m, 0.0 if m == "none" else lrs[(s, m)]) for m in cfg.modes]
            jobs += [Job(sp, runs) for sp in lists[s].specs]
        chunks = [jobs[i:i + cfg.chunk] for i in range(0, len(jobs), cfg.chunk)]
        say(f"[smat-eval] {base}: {len(jobs)} episodes x modes {cfg.modes} on {pool.workers} worker(s)")
        prog = Progress(len(jobs), cfg.progress_every_s, "episodes")
        t_eval = time.perf_counter()
        by_key: Dict[Tuple[str, int], EpisodeResult] = {}
        for _, results in pool.map(chunks):
            for r in results:
                by_key[(r.source, r.index)] = r
            prog.update(len(results))
        eval_s = time.perf_counter() - t_eval
        info, wstats = pool.info(), pool.stats()
    finally:
        pool.close()

    rows: List[ResultRow] = []
    accs: Dict[Tuple[str, str], np.ndarray] = {}
    ordered: List[EpisodeResult] = []
    ckpt = spec.path or (spec.backbone or {}).get("checkpoint") or (spec.backbone or {}).get("name", "")
    for s in sources:
        res = [by_key[(s, sp.index)] for sp in lists[s].specs]
        ordered += res
        for mi, m in enumerate(cfg.modes):
            col = column_label(base, m)
            a = np.array([100.0 * r.accuracy[mi] for r in res])
            accs[(s, col)] = a
            mean, ci, std, n = mean_ci95(a)
            hps = "off" if m == "none" or not cfg.hps.enabled else hps_used.get(s, "default")
            rows.append(ResultRow(source=s, kind=kind[s], split=cfg.split, method=col, mode=m, accuracy=mean,
                                  ci95=ci, std=std, n=n, episodes_sha256=lists[s].sha256, seed=cfg.seed,
                                  lr="" if m == "none" else f"{lrs[(s, m)]:g}", hps=hps, checkpoint=str(ckpt)))
    table = markdown_table(rows)
    seconds = time.perf_counter() - t_start
    report = EvalReport(rows=rows, accuracies=accs, episodes=ordered, lists=lists, table=table, label=base,
                        seconds=seconds, episodes_per_s=len(ordered) / max(eval_s, 1e-9), lrs=lrs,
                        worker_info=info, worker_stats=wstats)
    if out_dir:
        report.files = write_outputs(report, cfg, kind, out_dir)
    say(f"[smat-eval] {base}: {len(ordered)} episodes in {eval_s:.1f} s ({report.episodes_per_s:.1f} ep/s); "
        f"total {seconds:.1f} s")
    return report


def write_outputs(report: EvalReport, cfg: EvalConfig, kind: Dict[str, str], out_dir: Path) -> Dict[str, Path]:
    import json

    files = {"results": write_results(report.rows, out_dir / "results.csv")}
    ep_rows = []
    for mi, m in enumerate(cfg.modes):
        col = column_label(report.label, m)
        for r in report.episodes:
            ep_rows.append([r.source, kind[r.source], r.split, r.index, r.ways, r.support, r.query, col,
                            100.0 * r.accuracy[mi]])
    files["episodes"] = write_episodes(ep_rows, out_dir / "episodes.csv")
    (out_dir / "table.md").write_text(report.table)
    files["table"] = out_dir / "table.md"
    (out_dir / "eval_config.yaml").write_text(to_yaml(cfg))
    files["config"] = out_dir / "eval_config.yaml"
    alphas = {f"{r.source}/{r.index}": r.alpha for r in report.episodes if r.alpha is not None}
    summary = {
        "label": report.label, "seconds": report.seconds, "episodes_per_s": report.episodes_per_s,
        "lists": {s: {"path": str(fl.path), "sha256": fl.sha256, "episodes": len(fl.specs)} for s, fl in report.lists.items()},
        "lrs": {f"{s}/{m}": lr for (s, m), lr in report.lrs.items()},
        "workers": report.worker_info, "worker_stats": report.worker_stats,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    files["summary"] = out_dir / "summary.json"
    if alphas:
        (out_dir / "alpha.json").write_text(json.dumps(alphas))
        files["alpha"] = out_dir / "alpha.json"
    return files


__all__ = ["EvalReport", "Progress", "evaluate", "model_spec_for", "pick_lr", "write_outputs"]
