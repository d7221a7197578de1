#!/usr/bin/env python
"""Launcher overhead and scaling, measured side by side in one run.

The same tiny config (toy episodes) under every launcher of the one recipe:

* single process (``python -m smat_dist.train``: plain torch engine),
* torchrun with 1 and 2 ranks (``torchrun --nproc-per-node N -m smat_dist.train``: DeepSpeed, gloo),
* Ray Train with 1 and 2 workers (``smat-train``: DeepSpeed, gloo).

Start-up (Ray, process spawn, imports) is excluded: step times come from each run's own
``metrics.jsonl`` (``time_step``), median after ``--warmup`` steps. On a 2-core machine two ranks share
the cores (with Ray's own processes for the Ray rows), so the 2-vs-1 ratios here are a floor, not the
scaling on real nodes.

    python tools/bench_train.py                      # tiny ViT (D=64, depth 2), 32 px, 5-way
    python tools/bench_train.py --steps 30 --embed-dim 128 --depth 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _overrides(args, out: Path, name: str, ranks: int):
    threads = max(1, args.cpus // ranks)
    return [
        "model.backbone.name=vit_tiny_patch16_224", f"model.backbone.img_size={args.image_size}",
        "model.backbone.patch_size=8", f"model.backbone.embed_dim={args.embed_dim}", f"model.backbone.depth={args.depth}",
        "model.backbone.num_heads=2", "model.backbone.pretrained=false", "model.optim.warmup_epochs=0",
        "data.episodes=toy", f"dist.num_workers={ranks}", f"train.tasks_per_step={args.tasks_per_step}",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.tasks_per_epoch=100000",
        f"train.output_dir={out}", f"train.run_name={name}", f"dist.cpus_per_worker={threads}",
        f"train.threads={threads}", "monitor.enabled=false",
    ]


def seconds_per_task(args, run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time_step"] for r in rows[args.warmup:]) / args.tasks_per_step


def launch(args, out: Path, name: str, ranks: int, launcher: str) -> float:
    cfg = ["--config", str(REPO / "configs" / "smat.yaml"), *_overrides(args, out, name, ranks)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, args.cpus // ranks)))
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "smat_dist.train", *cfg]
    elif launcher == "single":
        cmd = [sys.executable, "-m", "smat_dist.train", *cfg]
    else:
        cmd = [sys.executable, "-m", "smat_dist.train.cli", *cfg, f"dist.local_num_cpus={args.cpus}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{launcher} x{ranks} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds_per_task(args, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tasks-per-step", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    rows = [("single process", "single", 1), ("torchrun, 1 rank", "torchrun", 1), ("torchrun, 2 ranks", "torchrun", 2),
            ("Ray Train, 1 worker", "ray", 1), ("Ray Train, 2 workers", "ray", 2)]
    t = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, launcher, ranks in rows:
            t[launcher, ranks] = launch(args, Path(tmp), f"{launcher}{ranks}", ranks, launcher)
            print(f"  measured {label}: {t[launcher, ranks]:.4f} s/task", flush=True)
    print(f"tiny ViT D={args.embed_dim} depth {args.depth}, {args.image_size} px, 5-way 3-shot 4-query, "
          f"{args.tasks_per_step} tasks/step, {args.cpus} CPUs, median of steps {args.warmup}..{args.steps - 1}")
    print(f"{'launcher':24s} {'s/task':>8s} {'tasks/s':>8s} {'vs single':>10s}")
    single = t["single", 1]
    for label, launcher, ranks in rows:
        v = t[launcher, ranks]
        print(f"{label:24s} {v:8.4f} {1 / v:8.2f} {v / single:9.2f}x")
    print(f"torchrun 1 rank / single process time per task: {t['torchrun', 1] / single:.2f}x")
    print(f"Ray 1 worker / torchrun 1 rank time per task: {t['ray', 1] / t['torchrun', 1]:.2f}x")
    print(f"2 ranks / 1 rank tasks/s: torchrun {t['torchrun', 1] / t['torchrun', 2]:.2f}x, "
          f"Ray {t['ray', 1] / t['ray', 2]:.2f}x")


if __name__ == "__main__":
    main()
