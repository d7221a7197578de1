#!/usr/bin/env python
"""Cost of one SMAT meta-training task against a plain ProtoNet meta-training step.

For each backbone (tiny ViT D=64/depth 2, ViT-S/16; random init, 84 px, fp32) on a 10-way 5-shot
10-query episode, with M=1 and M=8 experts: seconds per SMAT task (a meta-step of
``--tasks-per-step`` tasks divided by its size), seconds per ProtoNet step on the same backbone and
episode, their ratio, and peak RSS. Every configuration runs in its own subprocess so peak RSS is
its own and all see the same thread count.

    python tools/bench_step.py                    # both backbones
    python tools/bench_step.py --backbones tiny   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

BACKBONES = {
    "tiny": dict(name="vit_tiny_patch16_224", img_size=84, patch_size=12, embed_dim=64, depth=2, num_heads=2),
    "vit_s16": dict(name="vit_small_patch16_224", img_size=84),
}


def _episode(ways=10, shots=5, queries=10, size=84):
    import torch

    from smat_dist.episode import Episode

    g = torch.Generator().manual_seed(0)
    base = Episode(  # made once: image synthesis must not be timed
        support_x=torch.randn(ways * shots, 3, size, size, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.randn(ways * queries, 3, size, size, generator=g),
        query_y=torch.arange(ways).repeat_interleave(queries),
    )
    return lambda i: dataclasses.replace(base, index=i)


def run_one(kind: str, backbone: str, experts: int, repeats: int, tasks_per_step: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    make = _episode()
    if kind == "protonet":
        import timm

        from smat_dist.smat.protonet import cosine_logits, prototypes

        spec = dict(BACKBONES[backbone])
        model = timm.create_model(spec.pop("name"), num_classes=0, global_pool="token", **spec)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(i):
            ep = make(i)
            head = prototypes(model(ep.support_x), ep.support_y, 10)
            loss = F.cross_entropy(cosine_logits(model(ep.query_x), head, 10.0), ep.query_y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        per_call = 1
    else:
        from smat_dist.config import TrainConfig
        from smat_dist.smat import SMAT, ModelConfig
        from smat_dist.smat.config import BackboneConfig, GateConfig
        from smat_dist.train.launch import Trainer

        cfg = ModelConfig(backbone=BackboneConfig(**BACKBONES[backbone]), gates=GateConfig(num_experts=experts))
        trainer = Trainer(SMAT(cfg), TrainConfig(tasks_per_step=tasks_per_step, tasks_per_epoch=1))

        def step(i):
            trainer.train_step([make(i * tasks_per_step + j) for j in range(tasks_per_step)])

        per_call = tasks_per_step
    step(0)  # warm-up (allocator, lazy init)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        step(r + 1)
        times.append((time.perf_counter() - t0) / per_call)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return dict(kind=kind, backbone=backbone, experts=experts, sec_per_task=min(times), peak_rss_gb=rss_gb,
                threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks-per-step", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, backbone, experts = args.child.split(":")
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(kind, backbone, int(experts), args.repeats, args.tasks_per_step)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = {}
    for backbone in args.backbones:
        for kind, experts in (("protonet", 0), ("smat", 1), ("smat", 8)):
            cmd = [sys.executable, __file__, "--child", f"{kind}:{backbone}:{experts}", "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--tasks-per-step", str(args.tasks_per_step)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows[(backbone, kind, experts)] = res
            print(f"  measured {backbone:8s} {kind:8s} M={experts}: {res['sec_per_task']:.3f} s/task, "
                  f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    print()
    print(f"10-way 5-shot 10-query, 84 px, fp32, {args.threads} threads, {args.tasks_per_step} tasks per meta-step")
    print(f"{'backbone':9s} {'M':>2s} {'SMAT s/task':>12s} {'ProtoNet s':>11s} {'SMAT/ProtoNet':>14s} "
          f"{'M8/M1':>6s} {'peak RSS GB':>12s}")
    for backbone in args.backbones:
        pn = rows[(backbone, "protonet", 0)]
        m1 = rows[(backbone, "smat", 1)]
        for experts in (1, 8):
            r = rows[(backbone, "smat", experts)]
            ratio_m = r["sec_per_task"] / m1["sec_per_task"]
            print(f"{backbone:9s} {experts:2d} {r['sec_per_task']:12.3f} {pn['sec_per_task']:11.3f} "
                  f"{r['sec_per_task'] / pn['sec_per_task']:14.2f} {ratio_m:6.2f} {r['peak_rss_gb']:12.2f}")
        print(f"{backbone:9s} ProtoNet peak RSS {pn['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
