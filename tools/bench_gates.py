#!/usr/bin/env python
"""The gate passes of one meta-step on their own, compiled vs eager, side by side.

A flat ViT-S/16-sized gate tensor (|θ| = 21,614,976 groups, M = 8 by default; no backbone) and, per pass
of ``smat_dist/smat/gates.py``, the best of ``--repeats`` wall times for each ``model.gates.kernel``, and a
meta-step's total (1 count, B merges of which the last with E, B ∇α, 1 flush, 1 test count).

    python tools/bench_gates.py                     # ≈ 2 min on 2 cores
    python tools/bench_gates.py --groups 1000000 --experts 8 --tasks 4
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=21_614_976)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", nargs="+", default=["compiled", "eager"], choices=["compiled", "eager"])
    args = ap.parse_args()

    import torch

    from smat_dist.smat.backbone import ParamSlot
    from smat_dist.smat.config import GateConfig
    from smat_dist.smat.gates import GateLayout, HardConcreteGates

    torch.set_num_threads(args.threads)
    G, M, B = args.groups, args.experts, args.tasks
    layout = GateLayout([ParamSlot("w", torch.Size([G]), 0, G)], structured=False)
    alpha, row, rows, alphas = torch.rand(M), torch.randn(G), torch.randn(B, G), torch.rand(B, M)
    table = {}
    for kernel in args.kernels:
        gates = HardConcreteGates(layout, GateConfig(num_experts=M, kernel=kernel))
        keys = gates.keys(1)
        passes = {
            "count": lambda: gates.sample(1),
            "merge": lambda: gates.merge_mask(keys, alpha),
            "merge+E": lambda: gates.merge_mask(keys, alpha, with_density=True),
            "alpha_grad": lambda: gates.alpha_grad(keys, row),
            "flush": lambda: gates.flush_grad(keys, alphas, rows, torch.ones(M)),
            "test_count": lambda: gates.test_sparsity(),
        }
        for name, fn in passes.items():
            fn()  # compile / warm up
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            table[(kernel, name)] = best
            print(f"  {kernel:8s} {name:10s} {best:.3f} s", flush=True)
    counts = {"count": 1, "merge": B - 1, "merge+E": 1, "alpha_grad": B, "flush": 1, "test_count": 1}
    print()
    print(f"gate passes: M = {M}, G = {G:,} groups ({M * G:,} gates), {B} tasks per meta-step, {args.threads} threads")
    print(f"{'pass':12s} {'per step':>8s} " + " ".join(f"{k + ' s':>12s}" for k in args.kernels))
    for name, n in counts.items():
        print(f"{name:12s} {n:8d} " + " ".join(f"{table[(k, name)]:12.3f}" for k in args.kernels))
    totals = {k: sum(n * table[(k, name)] for name, n in counts.items()) for k in args.kernels}
    print(f"{'meta-step':12s} {'':8s} " + " ".join(f"{totals[k]:12.3f}" for k in args.kernels))
    if len(args.kernels) == 2:
        print(f"compiled / eager: {totals['compiled'] / totals['eager']:.2f}")


if __name__ == "__main__":
    main()
