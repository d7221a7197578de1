"""Peak memory of SMAT meta-steps: this checkout against a git revision, measured side by side.

    python tools/bench_memory.py --ref e7019f1                      # ViT-S/16, M = 8, 2 tasks, 3 steps
    python tools/bench_memory.py --ref HEAD~3 --backbone tiny --experts 8

Each tree runs in its own child process (its ``smat_dist`` first on ``PYTHONPATH``; the revision is
checked out into a temporary worktree, removed afterwards) with the same model and episodes
(``tools/bench_step.py``'s), a warm-up step and then ``--steps`` meta-steps; the child prints its
peak resident set size after each. Peak RSS is what a CPU run has to fit (``ru_maxrss``: never
decreases, so each line is the peak so far); on a GPU ``tools/bench_step.py`` reports the CUDA peak.
Steps are not logged (the test-gate sparsity is measured at logging steps only), as most are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
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
    trainer, make = training_setup(args.backbone, args.experts, threads=args.threads, tasks=tasks,
                                   image_size=args.image_size, episode=args.episode)

    def rss_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    print(json.dumps(dict(step="built", rss_gb=rss_gb())), flush=True)
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        trainer.train_step([make(i * tasks + j) for j in range(tasks)])
        print(json.dumps(dict(step=i, rss_gb=rss_gb(), sec=time.perf_counter() - t0)), flush=True)


def measure(tree: Path, args) -> list:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--experts", str(args.experts),
           "--tasks-per-step", str(args.tasks_per_step), "--steps", str(args.steps), "--threads", str(args.threads),
           "--image-size", str(args.image_size), "--episode", args.episode]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise SystemExit(f"bench_memory: {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for r in rows:
        print(f"  {tree.name:>12s} step {r['step']!s:>5s}: peak RSS {r['rss_gb']:.2f} GB"
              + (f" ({r['sec']:.1f} s)" if "sec" in r else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=False, help="git revision to compare this checkout with")
    ap.add_argument("--backbone", default="vit_s16")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tasks-per-step", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="meta-steps after the warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=84)
    ap.add_argument("--episode", default="10w5s10q")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still remove the temporary worktree
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        trees = {"this checkout": REPO}
        if args.ref:
            ref_tree = Path(tmp) / f"ref-{args.ref.replace('/', '_')}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(ref_tree), args.ref],
                           check=True)
            trees = {args.ref: ref_tree, "this checkout": REPO}
        try:
            for name, tree in trees.items():
                print(f"{name} ({tree}):", flush=True)
                results[name] = measure(tree, args)
        finally:
            if args.ref:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_tree)], check=False)
    print(f"\n{args.backbone}, M = {args.experts}, {args.tasks_per_step} tasks per meta-step, {args.episode}, "
          f"{args.image_size} px, fp32, {args.threads} threads: peak RSS over the warm-up and {args.steps} steps")
    peaks = {name: rows[-1]["rss_gb"] for name, rows in results.items()}
    for name, gb in peaks.items():
        print(f"  {name:>16s}: {gb:.2f} GB")
    if args.ref:
        print(f"  this checkout / {args.ref}: {peaks['this checkout'] / peaks[args.ref]:.2f}")


if __name__ == "__main__":
    main()
