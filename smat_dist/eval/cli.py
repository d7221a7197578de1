"""``smat-eval``: meta-test a checkpoint, merge result tables, or draw the Figure-5 analyses.

    smat-eval --checkpoint RUN_OR_FILE --data DATA_DIR [--out DIR] [--label L] [key=value ...]
    smat-eval --method pre (--checkpoint RUN | model.backbone.checkpoint=FILE | model.backbone.name=T
              model.backbone.pretrained=true) --data DATA_DIR [...]
    smat-eval --compare a/results.csv b/results.csv ... [--out table.md]
    smat-eval --compare REF/results.csv[,SEED2/results.csv...] OTHER/results.csv[,...] --paired [--margin 0.5]
    smat-eval analyse RUN_OR_FILE [--data DATA_DIR] [--out DIR] [key=value ...]

``key=value`` overrides :class:`smat_dist.eval.config.EvalConfig` (e.g. ``episodes=100
modes=[none,full,lora] actors=2 finetune.steps=20 data.episode.num_ways=5``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional

from smat_dist.data.sampler import SamplerError
from smat_dist.data.store import DataError
from smat_dist.errors import ConfigError
from smat_dist.eval.config import load_eval_config
from smat_dist.eval.report import ReportError, compare, paired_table, read_episode_scores, write_results
from smat_dist.eval.stats import EpisodeMismatch

PROG = "smat-eval"


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Meta-test a model on frozen episodes of every source "
                                "(ID: test split of the meta-training sources; OOD: the others).",
                                epilog="Also: `smat-eval --compare A.csv B.csv ...` and `smat-eval analyse RUN`.")
    p.add_argument("--checkpoint", help="run directory holding model.safetensors, or the file")
    p.add_argument("--method", default="model", choices=["model", "pre"],
                   help="model: the checkpoint as meta-trained (label from its model.method); "
                        "pre: the pre-trained ProtoNet baseline (θ_pre of --checkpoint, or model.backbone.*)")
    p.add_argument("--data", help="dataset root (sets data.root)")
    p.add_argument("--out", help="output directory (results.csv, episodes.csv, table.md, ...)")
    p.add_argument("--label", help="method label for the results (default from model.method: SMAT, PMF, ...)")
    p.add_argument("--episodes-dir", help="where frozen episode lists are cached (default DATA_DIR/episodes)")
    p.add_argument("--config", action="append", default=[], help="EvalConfig YAML (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="EvalConfig key=value overrides")
    return p


def _overrides(a) -> List[str]:
    ov = list(a.overrides)
    if getattr(a, "data", None):
        ov.append(f"data.root={a.data}")
    if getattr(a, "episodes_dir", None):
        ov.append(f"episodes_dir={a.episodes_dir}")
    if getattr(a, "quiet", False):
        ov.append("progress_every_s=-1")
    return ov


def _check_image_size(cfg, overrides: List[str], img_size: int) -> None:
    for o in overrides:
        if o.split("=", 1)[0].strip() == "data.image_size" and cfg.data.image_size != img_size:
            raise ConfigError(f"data.image_size={cfg.data.image_size} differs from the model's backbone.img_size "
                              f"({img_size}); evaluation images are always at the model's resolution")


def cmd_eval(argv: List[str], *, say: Optional[Callable[[str], None]] = None, table: bool = True) -> int:
    """``say``: where progress lines go (default stderr; ``-q`` drops them); ``table=False`` leaves the
    results table to the caller (the demo prints one side-by-side table of all methods instead)."""
    a = _eval_parser().parse_intermixed_args(argv)
    from smat_dist.eval.runner import evaluate, model_spec_for  # torch, once the arguments are checked

    ov = _overrides(a)
    cfg = load_eval_config(ov, a.config)
    if not a.data and not any(o.startswith("data.root=") for o in ov):
        raise ConfigError("--data DATA_DIR is required (the dataset root holding <source>/manifest.json)")
    if a.out:
        from smat_dist.fsutil import check_writable_dir

        check_writable_dir(a.out, "--out")  # before the evaluation, not after it
    spec = model_spec_for(cfg, a.checkpoint, a.method)
    _check_image_size(cfg, ov, spec.img_size)
    report = evaluate(cfg, a.checkpoint, a.method, a.label, a.out, say=(lambda m: None) if a.quiet else say)
    if table:
        print(report.table, end="")
    if a.out:
        print(f"[smat-eval] wrote {', '.join(str(p) for p in report.files.values())}")
    return 0


def cmd_compare(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} --compare", description="Merge results.csv files into one table, "
                                "or (--paired) compare them episode by episode against the first.")
    p.add_argument("--compare", nargs="+", required=True, metavar="RESULTS_CSV",
                   help="with --paired, an input may be A/results.csv,B/results.csv,...: one per seed")
    p.add_argument("--out", help="write the Markdown table here (and a merged CSV next to it)")
    p.add_argument("--paired", action="store_true", help="paired per-episode differences of each input to the "
                   "first (episodes.csv next to each results.csv; different episode lists are refused); with "
                   "several seeds per input the ± covers seeds × episodes")
    p.add_argument("--margin", type=float, help="with --paired: equivalence margin in points (TOST: "
                   "'equivalent' when the 90%% interval lies inside ±margin)")
    p.add_argument("--mode", default="none", help="with --paired: which fine-tuning mode (none, full, lora)")
    a = p.parse_args(argv)

    if a.margin is not None and not a.paired:
        raise ConfigError("--margin needs --paired")
    if a.paired:
        if len(a.compare) < 2:
            raise ConfigError("--paired needs at least two inputs (the first is the reference)")
        groups = [[read_episode_scores(x, a.mode) for x in arg.split(",") if x] for arg in a.compare]
        if len({len(g) for g in groups}) != 1:
            raise ConfigError(f"--paired: every input needs the same number of seeds, got {[len(g) for g in groups]}")
        table = paired_table(groups, margin=a.margin)
        print(table, end="")
        if a.out:
            out = Path(a.out)
            out = out / "paired.md" if out.suffix.lower() != ".md" else out
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
            print(f"[smat-eval] wrote {out}")
        return 0
    rows, table = compare(a.compare)
    print(table, end="")
    if a.out:
        out = Path(a.out)
        if out.suffix.lower() != ".md":
            out.mkdir(parents=True, exist_ok=True)
            out = out / "table.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        write_results(rows, out.with_suffix(".csv"))
        print(f"[smat-eval] wrote {out} and {out.with_suffix('.csv')}")
    return 0


def cmd_analyse(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} analyse", description="Figure-5 analyses of a checkpoint: non-zero "
                                "parameters per expert by layer type and depth, mask overlap, expert selection per "
                                "source with a dendrogram (needs --data), and training curves from metrics.jsonl.")
    p.add_argument("run", help="run directory (model.safetensors, metrics.jsonl) or the model file")
    p.add_argument("--data", help="dataset root: α per source from frozen test episodes")
    p.add_argument("--out", help="output directory (default RUN/analysis)")
    p.add_argument("--episodes-dir", help="where frozen episode lists are cached (default DATA_DIR/episodes)")
    p.add_argument("overrides", nargs="*", help="EvalConfig key=value overrides (analyse.*, sources, seed, data.*)")
    a = p.parse_intermixed_args(argv)
    from smat_dist.eval.analyse import analyse  # torch, once the arguments are checked

    cfg = load_eval_config(_overrides(a))
    res = analyse(a.run, data=a.data, out=a.out, cfg=cfg)
    for name, path in res.figures.items():
        print(f"[smat-eval] {name}: {path}")
    for note in res.notes:
        print(f"[smat-eval] note: {note}")
    return 0


def main(argv: Optional[List[str]] = None, *, say: Optional[Callable[[str], None]] = None, table: bool = True) -> int:
    """``smat-eval``; ``say`` and ``table`` as in :func:`cmd_eval` (an evaluation's console lines)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        if argv and argv[0] in ("analyse", "analyze"):
            return cmd_analyse(argv[1:])
        if "--compare" in argv:
            return cmd_compare(argv)
        return cmd_eval(argv, say=say, table=table)
    except (ConfigError, DataError, SamplerError, ReportError, EpisodeMismatch, FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --out that is read-only or under a file, a full disk...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
