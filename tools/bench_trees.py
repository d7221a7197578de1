#!/usr/bin/env python
"""Seconds per SMAT task of this checkout against a git revision, interleaved, for M = 1 and M = 8.

    python tools/bench_trees.py --ref 89ae85c                 # ViT-S/16, 2 rounds of 4 children, ≈ 20 min
    python tools/bench_trees.py --ref HEAD~1 --backbone tiny --rounds 3

The shared box's speed drifts by more than the effects measured here, so the four configurations (each
tree × M) alternate within a round, in reversed order every other round, and every ratio is taken within
a round. Each child is a fresh process with its tree's ``smat_dist`` first on ``PYTHONPATH`` (the revision
is checked out into a temporary worktree, removed afterwards), the model and episodes of
``tools/bench_step.py`` (random-init backbone, 10-way 5-shot 10-query, 84 px, fp32), one warm-up
meta-step and then the best of ``--repeats`` meta-steps. Only configuration keys away from their defaults
are set, so an older tree builds the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(args) -> None:
    sys.path.insert(0, str(HERE))
    from bench_step import training_setup

    tasks = args.tasks_per_step
    trainer, make = training_setup(args.backbone, args.child, threads=args.threads, tasks=tasks)
    times = []
    for i in range(args.repeats + 1):  # the first is the warm-up (compilation, allocator)
        t0 = time.perf_counter()
        trainer.train_step([make(i * tasks + j) for j in range(tasks)])
        times.append((time.perf_counter() - t0) / tasks)
    print(json.dumps(dict(sec_per_task=min(times[1:]))), flush=True)


def run(tree: Path, experts: int, args) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every training process (smat_dist/__init__.py)
    cmd = [sys.executable, __file__, "--child", str(experts), "--backbone", args.backbone, "--threads",
           str(args.threads), "--tasks-per-step", str(args.tasks_per_step), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_trees: {tree}, M = {experts} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])["sec_per_task"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="git revision to compare this checkout with (required)")
    ap.add_argument("--backbone", default="vit_s16", choices=["tiny", "vit_s16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed meta-steps per child (the best is kept)")
    ap.add_argument("--tasks-per-step", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    if not args.ref:
        ap.error("--ref is required")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still remove the temporary worktree
    per: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_trees_") as tmp:
        ref_tree = Path(tmp) / f"ref-{args.ref.replace('/', '_')}"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(ref_tree), args.ref], check=True)
        trees = {args.ref: ref_tree, "this checkout": REPO}
        arms = [(name, experts) for name in trees for experts in (1, 8)]
        try:
            for r in range(args.rounds):
                for name, experts in (arms if r % 2 == 0 else arms[::-1]):
                    sec = run(trees[name], experts, args)
                    per.setdefault((name, experts), []).append(sec)
                    print(f"  round {r + 1} {name:>13s} M={experts}: {sec:.3f} s/task", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_tree)], check=False)

    def ratios(a, b):
        return [x / y for x, y in zip(per[a], per[b])]

    print(f"\n{args.backbone}, {args.tasks_per_step} tasks per meta-step, 10w5s10q, 84 px, fp32, {args.threads} threads, "
          f"{args.rounds} rounds (ratios within a round; median [min, max])")
    for label, values in [*((f"{name}: M8/M1", ratios((name, 8), (name, 1))) for name in trees),
                          *((f"M={m}: this checkout / {args.ref}", ratios(("this checkout", m), (args.ref, m))) for m in (1, 8))]:
        print(f"  {label:32s} {statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]  "
              + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
