"""Result files: ``results.csv`` (source × method), ``episodes.csv`` (per episode) and the Markdown
table in the layout of the paper's Table 1 (rows: ID sources, ID avg, OOD sources, OOD avg;
columns: methods, grouped w/o fine-tuning, +full, +LoRA). ``compare`` merges several results.csv."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from smat_dist.eval.stats import EpisodeScores, compare_sources, difference_interval, paired_differences

RESULT_COLUMNS = ["source", "kind", "split", "method", "mode", "accuracy", "ci95", "std", "n", "episodes_sha256",
                  "seed", "lr", "hps", "checkpoint"]
EPISODE_COLUMNS = ["source", "kind", "split", "index", "ways", "support", "query", "method", "accuracy"]
MODE_ORDER = {"none": 0, "full": 1, "lora": 2}


class ReportError(ValueError):
    """A results file that cannot be read or merged; the message names the file."""


@dataclass
class ResultRow:
    source: str
    kind: str  # ID | OOD
    split: str
    method: str  # column label, e.g. SMAT+LoRA
    mode: str  # none | full | lora
    accuracy: float  # mean over episodes, %
    ci95: float  # 1.96·std/√n, %
    std: float  # sample std, %
    n: int
    episodes_sha256: str
    seed: int
    lr: str  # fine-tuning lr used ('' for none)
    hps: str  # off | valid | test | default
    checkpoint: str


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_results(rows: Sequence[ResultRow], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RESULT_COLUMNS)
        for r in rows:
            d = asdict(r)
            w.writerow([_fmt(d[c]) for c in RESULT_COLUMNS])
    return path


def write_episodes(rows: Iterable[Sequence], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(EPISODE_COLUMNS)
        for r in rows:
            w.writerow([_fmt(v) for v in r])
    return path


def read_results(path: str | Path) -> List[ResultRow]:
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p}: no such results file")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("source", "kind", "method", "mode", "accuracy", "ci95", "n") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{p}: not a smat-eval results.csv (missing columns {missing})")
        rows = []
        for i, d in enumerate(reader, 2):
            try:
                rows.append(ResultRow(
                    source=d["source"], kind=d["kind"], split=d.get("split", "test"), method=d["method"],
                    mode=d["mode"], accuracy=float(d["accuracy"]), ci95=float(d["ci95"]),
                    std=float(d.get("std") or "nan"), n=int(d["n"]), episodes_sha256=d.get("episodes_sha256", ""),
                    seed=int(d.get("seed") or 0), lr=d.get("lr", ""), hps=d.get("hps", ""),
                    checkpoint=d.get("checkpoint", "")))
            except (TypeError, ValueError) as exc:
                raise ReportError(f"{p}:{i}: bad value: {exc}") from None
    if not rows:
        raise ReportError(f"{p}: holds no result rows")
    return rows


def read_episode_scores(path: str | Path, mode: str = "none") -> EpisodeScores:
    """``path``: an evaluation's output directory or its results.csv (episodes.csv lies next to it)."""
    p = Path(path)
    results = p / "results.csv" if p.is_dir() else p
    rows = [r for r in read_results(results) if r.mode == mode]
    if not rows:
        raise ReportError(f"{results}: no results of mode {mode!r}")
    method = rows[0].method
    episodes = results.parent / "episodes.csv"
    if not episodes.is_file():
        raise ReportError(f"{episodes}: no such file (per-episode accuracies, written by smat-eval next to "
                          f"results.csv); paired differences need it")
    acc: Dict[str, Dict[int, float]] = {r.source: {} for r in rows}
    with open(episodes, newline="") as f:
        for i, d in enumerate(csv.DictReader(f), 2):
            if d.get("method") != method or d.get("source") not in acc:
                continue
            try:
                acc[d["source"]][int(d["index"])] = float(d["accuracy"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ReportError(f"{episodes}:{i}: bad value: {exc}") from None
    for r in rows:
        if len(acc[r.source]) != r.n:
            raise ReportError(f"{episodes}: {len(acc[r.source])} episodes of {r.source!r} for {method}, but "
                              f"{results.name} says n = {r.n}")
    return EpisodeScores(path=results, method=method, acc=acc, sha={r.source: r.episodes_sha256 for r in rows},
                         kind={r.source: r.kind for r in rows}, split={r.source: r.split for r in rows})


def _cell(acc: float, ci: float) -> str:
    return f"{acc:.2f}" if math.isnan(ci) else f"{acc:.2f} ± {ci:.2f}"


def markdown_table(rows: Sequence[ResultRow], title: Optional[str] = None) -> str:
    """Table 1 layout. Averages are unweighted means over the group's sources (ID avg, OOD avg).

    A source grouped differently by two inputs, or scored on different episode lists (sha256 of
    the frozen list), gets a note under the table: such numbers must not be read side by side.
    """
    methods: List[Tuple[str, str]] = []
    for r in rows:
        if (r.method, r.mode) not in methods:
            methods.append((r.method, r.mode))
    methods.sort(key=lambda m: MODE_ORDER.get(m[1], 9))  # stable: first-seen order inside a group
    cols = [m for m, _ in methods]
    kind: Dict[str, str] = {}
    notes: List[str] = []
    for r in rows:
        if r.source in kind and kind[r.source] != r.kind:
            note = f"`{r.source}` is {kind[r.source]} for one input and {r.kind} for another; listed as {kind[r.source]}."
            if note not in notes:
                notes.append(note)
        kind.setdefault(r.source, r.kind)
    lists: Dict[str, Dict[str, List[str]]] = {}  # source -> episode-list sha256 -> methods scored on it
    for r in rows:
        if r.episodes_sha256:
            methods_on = lists.setdefault(r.source, {}).setdefault(r.episodes_sha256, [])
            if r.method not in methods_on:
                methods_on.append(r.method)
    for s, by_list in lists.items():
        if len(by_list) > 1:
            which = "; ".join(f"{', '.join(ms)} on {sha[:12]}" for sha, ms in by_list.items())
            notes.append(f"`{s}`: methods were scored on different episode lists ({which}); "
                         f"their accuracies are not measured on the same tasks.")
    cell = {(r.source, r.method): r for r in rows}
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| Source | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    partial = False
    for group in ("ID", "OOD"):
        srcs = [s for s in kind if kind[s] == group]
        if not srcs:
            continue
        for s in srcs:
            vals = [_cell(cell[(s, c)].accuracy, cell[(s, c)].ci95) if (s, c) in cell else "–" for c in cols]
            lines.append(f"| {s} | " + " | ".join(vals) + " |")
        avgs = []
        for c in cols:
            accs = [cell[(s, c)].accuracy for s in srcs if (s, c) in cell]
            if not accs:
                avgs.append("–")
                continue
            mark = ""
            if len(accs) < len(srcs):
                mark, partial = "†", True
            avgs.append(f"**{sum(accs) / len(accs):.2f}**{mark}")
        lines.append(f"| **{group} avg** | " + " | ".join(avgs) + " |")
    lines.append("")
    ns = sorted({r.n for r in rows})
    lines.append(f"Accuracy in % over n = {', '.join(map(str, ns))} episodes per source; ± is the 95% CI half-width "
                 "1.96·s/√n (sample std). Averages are unweighted means over sources.")
    if partial:
        lines.append("† average over the sources this method was evaluated on, fewer than the group's.")
    lines += notes
    return "\n".join(lines) + "\n"


def paired_table(groups: Sequence[Sequence[EpisodeScores]], *, margin: Optional[float] = None) -> str:
    """Markdown: each group's paired per-episode difference to the first group (``groups[g][s]`` = seed s),
    per source and as ID / OOD averages (the first group's grouping). With ≥ 2 seeds per group the ±
    covers seeds × episodes (:func:`~smat_dist.eval.stats.two_level_interval`), with one evaluation each
    only episodes. ``margin``: an "equivalent within ±margin?" row per average (TOST). Different episode
    lists raise :class:`~smat_dist.eval.stats.EpisodeMismatch`."""
    ref = groups[0]
    names = []
    for g in groups:
        tag = g[0].path.parent.name
        label = f"{g[0].method} ({tag})" if tag else g[0].method
        names.append(label + (f" × {len(g)} seeds" if len(g) > 1 else ""))
    sources = list(ref[0].acc)
    by_kind = {k: [s for s in sources if ref[0].kind[s] == k] for k in ("ID", "OOD")}
    diffs = [paired_differences(g, ref, sources) for g in groups[1:]]
    lines = [f"### Paired differences against {names[0]}", "",
             "| source | kind | " + " | ".join(f"{n} − ref" for n in names[1:]) + " |",
             "|---|---|" + "---|" * len(diffs)]
    for kind, srcs in by_kind.items():
        for s in srcs:
            lines.append(f"| {s} | {kind} | " + " | ".join(str(difference_interval({s: d[s]})) for d in diffs) + " |")
        if srcs:
            lines.append(f"| **{kind} avg** | | " + " | ".join(
                f"**{difference_interval({s: d[s] for s in srcs})}**" for d in diffs) + " |")
    if margin is not None:
        for kind, srcs in by_kind.items():
            if srcs:
                lines.append(f"| {kind} avg equivalent within ±{margin:g}? | | " + " | ".join(
                    compare_sources(g, ref, srcs, margin=margin)[1].verdict for g in groups[1:]) + " |")
    seeds = sorted({len(g) for g in groups})
    lines += ["", "Differences in points on the same frozen episodes (episode-list sha256 checked); ± is the 95 % "
              "interval " + ("over seeds × episodes (seeds paired by position; crossed random effects, t with "
                             "Welch–Satterthwaite df)" if seeds[0] > 1 else "over episodes only (one evaluation per "
                             "side: training randomness is not in it)") + "."]
    if margin is not None:
        lines.append(f"Equivalent: the 90 % interval lies inside ±{margin:g} (TOST); different: the 95 % interval "
                     "excludes 0; unresolved: neither.")
    return "\n".join(lines) + "\n"


def compare(paths: Sequence[str | Path]) -> Tuple[List[ResultRow], str]:
    """Merge results.csv files into one table; a method label found in several files is suffixed
    with the file's run name so columns never silently overwrite each other."""
    if not paths:
        raise ReportError("--compare needs at least one results.csv")
    loaded = [(Path(p), read_results(p)) for p in paths]
    owners: Dict[str, List[int]] = {}
    for i, (_, rows) in enumerate(loaded):
        for m in {r.method for r in rows}:
            owners.setdefault(m, []).append(i)
    merged: List[ResultRow] = []
    for i, (p, rows) in enumerate(loaded):
        tag = p.parent.name if p.stem == "results" else p.stem
        for r in rows:
            if len(owners[r.method]) > 1:
                r = ResultRow(**{**asdict(r), "method": f"{r.method} ({tag or i})"})
            merged.append(r)
    seen = set()
    for r in merged:
        key = (r.source, r.method)
        if key in seen:
            raise ReportError(f"two rows for source {r.source!r}, method {r.method!r}; give distinct results files")
        seen.add(key)
    return merged, markdown_table(merged)


__all__ = ["EPISODE_COLUMNS", "RESULT_COLUMNS", "EpisodeScores", "ReportError", "ResultRow", "compare",
           "markdown_table", "paired_table", "read_episode_scores", "read_results", "write_episodes", "write_results"]
