#!/usr/bin/env python
"""The gate passes of one meta-step on their own, compiled vs eager, side by side.

A flat ViT-S/16-sized gate tensor (|θ| = 21,614,976 groups, M = 8 by default; no backbone) and, per pass
of ``smat_dist/smat/gates.py``, the best of ``--repeats`` wall times for each ``model.gates.kernel``, and a
meta-step's total under three schedules: "before" (a count pass, B merges of which the last with E, B ∇α
passes, 1 flush), ``alpha_grad=task`` (eagerly, the draw counted by the first merge) and
``alpha_grad=flush`` (that, and every ∇α inside the flush), each with the test count of a logged step.

    python tools/bench_gates.py                     # ≈ 2 min on 2 cores
    python tools/bench_gates.py --groups 1000000 --experts 8 --tasks 4
    python tools/bench_gates.py --kernels compiled  # ≈ 1 min
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
        draw = gates.sample(1)
        keys = draw.keys
        passes = {
            "count": lambda: gates.sample(1),
            "merge+count": lambda: gates.merge_mask(gates.sample(1, measure=False), alpha),
            "merge": lambda: gates.merge_mask(draw, alpha),
            "merge+E": lambda: gates.merge_mask(draw, alpha, with_density=True),
            "alpha_grad": lambda: gates.alpha_grad(keys, row),
            "flush": lambda: gates.flush_grad(keys, alphas, rows, torch.ones(M)),
            "flush+∇α": lambda: gates.flush_grad(keys, alphas, rows, torch.ones(M), with_alpha_grad=True),
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
    def schedule(kernel: str, fold_count: bool, fold_alpha: bool) -> dict:
        """Passes per meta-step (B >= 2): the last merge adds E; a logged step's test count."""
        counted = fold_count and kernel == "eager"  # compiled, the count keeps its own pass (gates.merge_mask)
        passes_ = {"count": 0 if counted else 1, "merge+count": 1 if counted else 0, "merge": B - 1 - counted,
                   "merge+E": 1, "alpha_grad": 0 if fold_alpha else B, "flush": 0 if fold_alpha else 1,
                   "flush+∇α": 1 if fold_alpha else 0, "test_count": 1}
        return {name: n for name, n in passes_.items() if n}

    schedules = {"before": (False, False), "alpha_grad=task": (True, False), "alpha_grad=flush": (True, True)}
    print()
    print(f"gate passes: M = {M}, G = {G:,} groups ({M * G:,} gates), {B} tasks per meta-step, {args.threads} threads")
    print(f"{'pass':12s} " + " ".join(f"{k + ' s':>12s}" for k in args.kernels))
    for name in passes:
        print(f"{name:12s} " + " ".join(f"{table[(k, name)]:12.3f}" for k in args.kernels))
    totals = {}
    for label, folds in schedules.items():
        totals[label] = {}
        for k in args.kernels:
            plan = schedule(k, *folds)
            totals[label][k] = sum(n * table[(k, name)] for name, n in plan.items())
        print(f"meta-step, {label:17s} " + " ".join(f"{totals[label][k]:12.3f}" for k in args.kernels))
    for k in args.kernels:
        print(f"{k}: alpha_grad=flush / before {totals['alpha_grad=flush'][k] / totals['before'][k]:.2f}, "
              f"alpha_grad=task / before {totals['alpha_grad=task'][k] / totals['before'][k]:.2f}  "
              f"(passes per step: " + "; ".join(f"{label}: " + ", ".join(f"{n} {name}" for name, n in schedule(k, *f).items())
                                                for label, f in schedules.items()) + ")")
    if len(args.kernels) == 2:
        for label in schedules:
            print(f"{label}: compiled / eager {totals[label]['compiled'] / totals[label]['eager']:.2f}")


if __name__ == "__main__":
    main()
