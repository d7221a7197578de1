"""The one-command demo (README command 1): Pre vs PMF vs SMAT on the synthetic benchmark, on CPU.

1. ``smat-data synth``      the synthetic multi-domain benchmark (4 ID sources, 3 OOD sources);
2. pre-training              θ_pre for a small ViT on the ID sources' training classes (the "P");
3. ``smat-train`` PMF        dense meta-tuning, local Ray, 2 workers (the "M" of PMF);
4. ``smat-train`` SMAT       sparse interpolated experts, same budget;
5. ``smat-eval``             Pre, PMF and SMAT on frozen test episodes of every source;
6. the Table-1-style comparison (also written to ``<out>/results.md``).

    python -m smat_dist.demo [--out runs/demo] [--keep] [--data ROOT] [key=value ...]

``--data`` uses an existing copy of the benchmark instead of building one: a local path or a URL
(``http(s)://``, ``s3://``, ``pipe:...{shard}...``; read through the node-local shard cache).

Overrides are routed by prefix: ``pretrain.<key>`` (:class:`smat_dist.pretrain.PretrainConfig`),
``eval.<key>`` (smat-eval's config), anything else goes to both ``smat-train`` runs
(e.g. ``train.max_steps=3``). The data and θ_pre are reused when their settings did not change;
the two training runs start afresh unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

from smat_dist import ray_session
from smat_dist.config import load_config, to_dict
from smat_dist.data.cli import main as data_main
from smat_dist.data.config import DataConfig
from smat_dist.data.location import resolve_root
from smat_dist.data.store import DataError, check_root
from smat_dist.eval.cli import main as eval_main
from smat_dist.train.cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "demo"

# The demo's evaluation: frozen episodes per source under the demo's scaled-down protocol.
EVAL_DEFAULTS = ["episodes=100"]
# θ_pre comes from the two natural-image-like ID sources only, as DINO's ImageNet pre-training never
# saw Omniglot or QuickDraw: glyphs and doodles are new domains that meta-training brings in.
PRETRAIN_DEFAULTS = ["epochs=10", "sources=[objects,textures]"]


class Stage:
    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {title}  (t = {self.elapsed()})", flush=True)

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60}m{s % 60:02d}s"


def _split(overrides: List[str]):
    pre, ev, run = [], [], []
    for o in overrides:
        if "=" not in o:
            raise SystemExit(f"demo: overrides must look like key=value, got {o!r}")
        if o.startswith("pretrain."):
            pre.append(o[len("pretrain."):])
        elif o.startswith("eval."):
            ev.append(o[len("eval."):])
        else:
            run.append(o)
    return pre, ev, run


def build_data(out: Path, scale: float) -> Path:
    data = out / "data"
    stamp = out / "data.json"
    want = json.dumps({"scale": scale, "seed": 0})
    if (data.is_dir() and stamp.exists() and stamp.read_text() == want
            and data_main(["verify", str(data), "--quick"]) == 0):
        print(f"reusing {data} (verified)")
        return data
    if data.exists():
        shutil.rmtree(data)
    rc = data_main(["synth", str(data), "--scale", str(scale)])
    if rc != 0:
        raise SystemExit(f"demo: smat-data synth failed ({rc})")
    stamp.write_text(want)
    return data


def build_backbone(out: Path, data: Path, overrides: List[str]) -> Path:
    from smat_dist.pretrain import PretrainConfig, pretrain  # torch, when this stage runs

    path = out / "backbone.safetensors"
    cfg = load_config(PretrainConfig, [], PRETRAIN_DEFAULTS + overrides + [f"data={data}", f"out={path}"])
    stamp = out / "backbone.json"
    want = json.dumps(to_dict(cfg), sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == want:
        print(f"reusing {path} (same pre-training settings)")
        return path
    pretrain(cfg)
    stamp.write_text(want)
    return path


def train(method: str, out: Path, data: Path, backbone: Path, overrides: List[str], keep: bool) -> Path:
    run_dir = out / method
    if run_dir.exists() and not keep:
        shutil.rmtree(run_dir)
    args = ["--config", str(CONFIGS / f"{method}.yaml"), f"train.output_dir={out}", f"train.run_name={method}",
            f"data.root={data}", f"model.backbone.checkpoint={backbone}", *overrides]
    print("smat-train " + " ".join(args), flush=True)
    rc = train_main(args)
    if rc != 0:
        raise SystemExit(f"demo: smat-train {method} failed ({rc})")
    return run_dir


def evaluate(out: Path, data: Path, runs: dict, overrides: List[str]) -> List[str]:
    """Pre, PMF and SMAT on the same frozen episodes. Each shows its progress; a line already shown (the
    episode lists: the same files for all three) is not repeated, and the tables wait for the side-by-side
    one of stage 6."""
    shown = set()

    def say(msg: str) -> None:
        if msg not in shown:
            shown.add(msg)
            print(msg, file=sys.stderr, flush=True)

    results: List[str] = []
    for label, argv in (
        ("Pre", ["--method", "pre", "--checkpoint", str(runs["smat"])]),
        ("PMF", ["--checkpoint", str(runs["pmf"])]),
        ("SMAT", ["--checkpoint", str(runs["smat"])]),
    ):
        dest = out / "eval" / label.lower()
        args = [*argv, "--data", str(data), "--out", str(dest), *EVAL_DEFAULTS, *overrides]
        print(f"smat-eval {' '.join(args)}", flush=True)
        rc = eval_main(args, say=say, table=False)
        if rc != 0:
            raise SystemExit(f"demo: smat-eval {label} failed ({rc})")
        results.append(str(dest / "results.csv"))
    return results


def compare(out: Path, results: List[str]) -> Path:
    """The side-by-side table (printed once, by smat-eval --compare) in <out>/results.md."""
    table = out / "results.md"
    rc = eval_main(["--compare", *results, "--out", str(table)])
    if rc != 0:
        raise SystemExit(f"demo: smat-eval --compare failed ({rc})")
    return table


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smat_dist.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--keep", action="store_true", help="resume the training runs instead of starting afresh")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--scale", type=float, default=1.0, help="class-count scale of the synthetic benchmark")
    ap.add_argument("--data", help="an existing synthetic benchmark (local path or URL) instead of building one")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    pre_over, eval_over, run_over = _split(a.overrides)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage = Stage(6)

    if a.data:
        stage(f"synthetic benchmark at {a.data}")
        data = resolve_root(a.data)
        try:
            print("sources: " + ", ".join(check_root(DataConfig(root=data))))
        except DataError as exc:
            raise SystemExit(f"demo: {exc}") from None
    else:
        stage("synthetic benchmark (smat-data synth)")
        data = build_data(out, a.scale)
    stage("pre-training θ_pre on the in-distribution training classes")
    backbone = build_backbone(out, data, pre_over)

    started = ray_session.connect(num_cpus=a.num_cpus)
    try:
        runs = {}
        stage("meta-training PMF (smat-train, local Ray, 2 workers)")
        runs["pmf"] = train("pmf", out, data, backbone, run_over, a.keep)
        stage("meta-training SMAT (smat-train, local Ray, 2 workers)")
        runs["smat"] = train("smat", out, data, backbone, run_over, a.keep)
        stage("meta-testing Pre, PMF and SMAT (smat-eval)")
        results = evaluate(out, data, runs, eval_over)
    finally:
        ray_session.shutdown(started)
    stage("results")
    table = compare(out, results)
    print(f"demo finished in {stage.elapsed()}; table in {table}, runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
