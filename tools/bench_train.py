#!/usr/bin/env python
"""Distributed-trainer overhead and scaling, measured side by side in one run.

1. seconds per task of a meta-step: the plain single-process trainer vs the distributed trainer
   (Ray Train + DeepSpeed) with 1 worker, same tiny config and episodes;
2. tasks/s of the distributed trainer with 2 workers vs 1 worker.

Start-up (Ray, worker processes, imports) is excluded: step times come from the runs' own
per-step records, after ``--warmup`` steps. On a 2-core machine two workers share the two cores
with Ray's own processes, so the 2-vs-1 ratio there is a floor, not the scaling on real nodes.

    python tools/bench_train.py                      # tiny ViT (D=64, depth 2), 32 px, 5-way
    python tools/bench_train.py --steps 30 --embed-dim 128 --depth 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _overrides(args, out: Path, name: str, workers: int):
    return [
        "model.backbone.name=vit_tiny_patch16_224", f"model.backbone.img_size={args.image_size}",
        "model.backbone.patch_size=8", f"model.backbone.embed_dim={args.embed_dim}", f"model.backbone.depth={args.depth}",
        "model.backbone.num_heads=2", "model.backbone.pretrained=false", "model.optim.warmup_epochs=0",
        "dist.episodes=toy", f"dist.num_workers={workers}", f"train.tasks_per_step={args.tasks_per_step}",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.tasks_per_epoch=100000",
        f"train.output_dir={out}", f"train.run_name={name}", f"dist.cpus_per_worker={max(1, args.cpus // workers)}",
        f"train.threads={max(1, args.cpus // workers)}",
    ]


def single_process(args, cfg) -> float:
    import torch

    from smat_dist.smat import SMAT
    from smat_dist.smat.toy import ToyEpisodes
    from smat_dist.smat.trainer import Trainer

    torch.set_num_threads(args.cpus)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(SMAT(cfg.model), cfg.train)
    toy = ToyEpisodes(num_classes=20, image_size=args.image_size, ways=5, shots=3, queries=4, seed=cfg.train.seed)
    times = []
    stream = toy.iterate(range(0, args.steps * args.tasks_per_step))
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step(stream, args.tasks_per_step)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[args.warmup:]) / args.tasks_per_step


def distributed(args, out: Path, workers: int) -> float:
    from smat_dist.config import RunConfig, load_config
    from smat_dist.dist.launcher import train

    name = f"w{workers}"
    cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"], _overrides(args, out, name, workers))
    res = train(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time_step"] for r in rows[args.warmup:]) / args.tasks_per_step


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

    import ray

    from smat_dist.config import RunConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"], _overrides(args, out, "single", 1))
        t_single = single_process(args, cfg)
        ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 log_to_driver=False)
        try:
            t_w1 = distributed(args, out, 1)
            t_w2 = distributed(args, out, 2)
        finally:
            ray.shutdown()
    print(f"tiny ViT D={args.embed_dim} depth {args.depth}, {args.image_size} px, 5-way 3-shot 4-query, "
          f"{args.tasks_per_step} tasks/step, {args.cpus} CPUs, median of steps {args.warmup}..{args.steps - 1}")
    print(f"{'trainer':34s} {'s/task':>8s} {'tasks/s':>8s}")
    print(f"{'single process':34s} {t_single:8.4f} {1 / t_single:8.2f}")
    print(f"{'Ray Train + DeepSpeed, 1 worker':34s} {t_w1:8.4f} {1 / t_w1:8.2f}")
    print(f"{'Ray Train + DeepSpeed, 2 workers':34s} {t_w2:8.4f} {1 / t_w2:8.2f}")
    print(f"distributed(1 worker) / single-process time per task: {t_w1 / t_single:.2f}x")
    print(f"2 workers / 1 worker tasks/s: {t_w1 / t_w2:.2f}x")


if __name__ == "__main__":
    main()
