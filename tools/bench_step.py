#!/usr/bin/env python
"""Cost of one SMAT meta-training task against a plain ProtoNet meta-training step.

For each backbone (tiny ViT D=64/depth 2, ViT-S/16; random init) on an episode (default 10-way 5-shot
10-query; ``--episode md``: the Meta-Dataset protocol's largest, 50-way with 500 support and 500 query
images), with M=1 and M=8 experts: seconds per SMAT task (a meta-step of ``--tasks-per-step`` tasks
divided by its size), seconds per ProtoNet step on the same backbone and episode, their ratio, peak RSS,
the matmul/attention FLOPs of one task counted by ``torch.utils.flop_counter`` and, on a GPU, peak
allocated and reserved memory and the MFU against the device's peak bf16 rate (:data:`PEAK_BF16_TFLOPS`).
Every configuration runs in its own subprocess so its peaks are its own; a configuration that fails is
reported with its error and the others still run; ``--json`` is rewritten after every row.

    python tools/bench_step.py                    # CPU, 84 px, fp32, both backbones
    python tools/bench_step.py --backbones tiny   # seconds
    python tools/bench_step.py --device cuda --precision bf16 --image-size 128 --episode md --json out.json
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


EPISODES = {"10w5s10q": (10, 5, 10), "md": (50, 10, 10)}  # ways, shots, queries per class

# Dense (no sparsity) bf16 tensor-core peak of each device, TFLOP/s, from the vendors' datasheets; the
# first name contained in torch.cuda.get_device_name() wins (so the more specific names come first).
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100 PCIe": 756.0, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0}


def peak_tflops(device_name: str):
    """The table's peak for ``device_name``, or None (CPU, unknown GPU: no MFU is reported)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _episode(ways: int, shots: int, queries: int, size: int, device):
    import torch

    from smat_dist.episode import Episode

    g = torch.Generator().manual_seed(0)
    base = Episode(  # made once, on the device: image synthesis and transfer are not timed
        support_x=torch.randn(ways * shots, 3, size, size, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.randn(ways * queries, 3, size, size, generator=g),
        query_y=torch.arange(ways).repeat_interleave(queries),
    ).to(device)
    return lambda i: dataclasses.replace(base, index=i)


GATE_DEFAULTS = dict(kernel="auto", alpha_grad="flush")  # GateConfig's defaults for the keys smat_trainer sets


def training_setup(backbone: str, experts: int, *, threads: int, tasks: int, image_size: int = 84,
                   episode: str = "10w5s10q"):
    """(trainer, make) of the benchmarks' children on CPU: ``threads`` torch threads, seed 0, the
    :func:`smat_trainer` and ``make(i)``, the fixed episode with index ``i``."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ways, shots, queries = EPISODES[episode]
    make = _episode(ways, shots, queries, image_size, torch.device("cpu"))
    return smat_trainer(backbone, experts, image_size=image_size, tasks=tasks), make


def smat_trainer(backbone: str, experts: int, *, image_size: int, tasks: int, device=None, precision: str = "fp32",
                 gate_kernel: str = "auto", alpha_grad: str = "flush"):
    """The benchmarks' SMAT :class:`~smat_dist.train.launch.Trainer`: a random-init ``backbone`` (a key of
    :data:`BACKBONES`) at ``image_size``, ``experts`` experts, ``tasks`` tasks per meta-step, no step logged
    (as most are: the test-gate sparsity is measured at logging steps only)."""
    from smat_dist.smat import SMAT, ModelConfig
    from smat_dist.smat.config import BackboneConfig, GateConfig
    from smat_dist.train.config import TrainConfig
    from smat_dist.train.launch import Trainer

    spec = dict(BACKBONES[backbone], img_size=image_size)
    # keys at their defaults are left unset, so tools/bench_memory.py and tools/bench_trees.py can build
    # this trainer in an older tree whose GateConfig lacks them
    gate_keys = dict(kernel=gate_kernel, alpha_grad=alpha_grad)
    gates = GateConfig(num_experts=experts, **{k: v for k, v in gate_keys.items() if v != GATE_DEFAULTS[k]})
    cfg = ModelConfig(backbone=BackboneConfig(**spec), gates=gates, precision=precision)
    model = SMAT(cfg) if device is None else SMAT(cfg).to(device)
    return Trainer(model, TrainConfig(tasks_per_step=tasks, tasks_per_epoch=1, max_steps=10**9, log_every=10**9))


def run_one(kind: str, backbone: str, experts: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device)
    torch.manual_seed(0)
    ways, shots, queries = EPISODES[args.episode]
    make = _episode(ways, shots, queries, args.image_size, device)
    spec = dict(BACKBONES[backbone], img_size=args.image_size)
    if kind == "protonet":
        import timm

        from smat_dist.smat.precision import backbone_autocast
        from smat_dist.smat.protonet import cosine_logits, prototypes

        model = timm.create_model(spec.pop("name"), num_classes=0, global_pool="token", **spec).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(i):
            ep = make(i)
            with backbone_autocast(args.precision, device):
                head = prototypes(model(ep.support_x).float(), ep.support_y, ways)
                loss = F.cross_entropy(cosine_logits(model(ep.query_x), head, 10.0), ep.query_y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        per_call = 1
    else:
        tasks = args.tasks_per_step
        trainer = smat_trainer(backbone, experts, image_size=args.image_size, tasks=tasks, device=device,
                               precision=args.precision, gate_kernel=args.gate_kernel, alpha_grad=args.alpha_grad)

        def step(i):
            trainer.train_step([make(i * tasks + j) for j in range(tasks)])

        per_call = tasks

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    from torch.utils.flop_counter import FlopCounterMode

    step(0)  # warm-up (allocator, lazy init, kernel selection)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for r in range(args.repeats):
        t0 = time.perf_counter()
        step(r + 1)
        sync()
        times.append((time.perf_counter() - t0) / per_call)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.repeats  # minor page faults per step
    best = min(times)
    # the peaks of training steps, read before the FLOP-counted step: under FlopCounterMode a ViT-S, M = 8
    # step took the process from 4.45 to 9.29 GB RSS (docs/performance.md), nothing like training
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    gpu_gb = reserved_gb = peak = None
    if device.type == "cuda":
        gpu_gb = torch.cuda.max_memory_allocated(device) / 1024**3
        reserved_gb = torch.cuda.max_memory_reserved(device) / 1024**3
        peak = peak_tflops(torch.cuda.get_device_name(device))
    flops_per_task = None
    if not args.rounds:  # --rounds compares times only
        with FlopCounterMode(display=False) as counter:  # one more step, counted (not timed)
            step(args.repeats + 1)
        flops_per_task = counter.get_total_flops() / per_call
        sync()
    row = dict(kind=kind, backbone=backbone, experts=experts, sec_per_task=best, tasks_per_s=1 / best,
               tflop_per_task=flops_per_task and flops_per_task / 1e12,
               achieved_tflops=flops_per_task and flops_per_task / best / 1e12,
               mfu=None if peak is None or flops_per_task is None else flops_per_task / best / (peak * 1e12),
               peak_tflops=peak,
               peak_rss_gb=rss_gb, peak_gpu_gb=gpu_gb, peak_reserved_gb=reserved_gb,
               threads=torch.get_num_threads(), device=args.device, page_faults_per_step=faults,
               precision=args.precision, image_size=args.image_size, episode=args.episode)
    if kind == "smat" and not args.no_gate_profile:
        gates = trainer.model.gates if hasattr(trainer, "model") else None
        row.update(gate_profile(lambda: step(args.repeats + 1), device))
        if gates is not None:
            row.update(gates=gates.logits.numel(), gate_kernel="compiled" if gates.compiled else "eager")
    return row


# ---------------------------------------------------------------- gate passes (issue 22)

GATE_RANGE = "smat.gates."  # the record_function prefix of every gate pass (smat_dist/smat/gates.py)


def enable_kernel_ranges() -> None:
    """Make each compiled CPU kernel a profiler event (set before anything compiles), so compiled gate
    passes show their kernel calls in the launch count."""
    try:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    except Exception:  # pragma: no cover - older/newer torch: counts then show the compiled regions only
        pass


def gate_profile(step, device) -> dict:
    """Profile one meta-step: the gate passes' share of its time and their operator launches.

    ``step()`` runs one meta-step. A launch is, on CPU, every profiler event inside a ``smat.gates.*``
    range (aten operators, compiled kernels); on a GPU, every kernel launch (runtime call) inside one.
    Gate time is the ranges' CPU time on CPU and their kernels' device time on a GPU.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    events = prof.events()
    ranges = [e for e in events if e.name.startswith(GATE_RANGE)]
    per_pass: dict = {}
    for e in ranges:
        key = e.name[len(GATE_RANGE):]
        sec = (e.device_time_total if cuda else e.cpu_time_total) / 1e6
        calls, secs = per_pass.get(key, (0, 0.0))
        per_pass[key] = (calls + 1, secs + sec)

    def in_gate_range(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith(GATE_RANGE):
                return True
            parent = parent.cpu_parent
        return False

    launches = sum(1 for e in events if in_gate_range(e) and not e.name.startswith(GATE_RANGE)
                   and (not cuda or "LaunchKernel" in e.name))
    gate_s = sum(sec for _, sec in per_pass.values())
    return dict(gate_s=gate_s, gate_share=gate_s / total, gate_launches=launches, profiled_step_s=total,
                gate_passes={k: dict(calls=c, s=round(s, 4)) for k, (c, s) in sorted(per_pass.items())})


def print_gate_table(rows: dict, backbones) -> None:
    """Per configuration: the gate passes' share of a (profiled) meta-step and their launches."""
    print()
    print("gate passes, one profiled meta-step per configuration (smat_dist/smat/gates.py)")
    print(f"{'backbone':9s} {'M':>2s} {'kernel':>9s} {'gates M·G':>12s} {'gate s':>7s} {'share':>6s} {'launches':>9s}  passes (calls, s)")
    for backbone in backbones:
        for experts in (1, 8):
            r = rows.get((backbone, "smat", experts))
            if not r or "gate_s" not in r:
                continue
            passes = ", ".join(f"{k} {v['calls']}x {v['s']:.3f}" for k, v in r["gate_passes"].items())
            print(f"{backbone:9s} {experts:2d} {r['gate_kernel']:>9s} {r['gates']:12,d} {r['gate_s']:7.3f} "
                  f"{r['gate_share']:6.1%} {r['gate_launches']:9d}  {passes}")


def _spread(name: str, ratios: list) -> str:
    return (f"{name} per round {', '.join(f'{x:.3f}' for x in ratios)}; median {sorted(ratios)[len(ratios) // 2]:.3f}, "
            f"min {min(ratios):.3f}, max {max(ratios):.3f}")


def interleaved_rounds(args, env, passthrough) -> None:
    """``--rounds N``: M=1 and M=8 SMAT children alternate N times per backbone, the order reversed every
    other round; per-round ratios and their spread (the shared box's load drifts, so only side-by-side
    rounds are comparable)."""
    thps = ["off", "on"] if args.thp == "both" else [args.thp]
    arms = [(thp, experts) for thp in thps for experts in (1, 8)]
    for backbone in args.backbones:
        per = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for thp, experts in (arms if r % 2 == 0 else arms[::-1]):
                cmd = [sys.executable, __file__, "--child", f"smat:{backbone}:{experts}", *passthrough,
                       "--rounds", str(args.rounds)]
                res, err = run_child(cmd, dict(env, THP_MEM_ALLOC_ENABLE="1" if thp == "on" else "0"))
                label = f"round {r + 1} {backbone} M={experts}" + (f" thp {thp}" if len(thps) > 1 else "")
                if res is None:
                    print(f"  FAILED   {label} {err}", file=sys.stderr, flush=True)
                    per[(thp, experts)].append(None)
                    continue
                per[(thp, experts)].append(res["sec_per_task"])
                print(f"  {label}: {res['sec_per_task']:.3f} s/task, {res['page_faults_per_step']:,.0f} page "
                      f"faults/step, peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)

        def ratios(a, b):
            return [x / y for x, y in zip(per[a], per[b]) if x is not None and y is not None]

        for thp in thps:
            if ratios((thp, 8), (thp, 1)):
                print(f"{backbone}" + (f" thp {thp}" if len(thps) > 1 else "") + ": "
                      + _spread("M8/M1", ratios((thp, 8), (thp, 1))))
        if len(thps) > 1:
            for experts in (1, 8):
                if ratios(("on", experts), ("off", experts)):
                    print(f"{backbone} M={experts}: " + _spread("thp on/off", ratios(("on", experts), ("off", experts))))


def run_child(cmd, env):
    """(row, None) from a measuring child, or (None, the last lines of its error output)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        res = None
    if res is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"(exit {proc.returncode}):\n{tail}"
    return res, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks-per-step", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--image-size", type=int, default=84)
    ap.add_argument("--episode", default="10w5s10q", choices=list(EPISODES))
    ap.add_argument("--json", help="also write the measured rows to this file (rewritten as each one finishes)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="instead of the table: alternate M=1 and M=8 SMAT this many times per backbone")
    ap.add_argument("--gate-kernel", default="auto", choices=["auto", "compiled", "eager"],
                    help="model.gates.kernel: how the gate passes run")
    ap.add_argument("--alpha-grad", default="flush", choices=["flush", "task"],
                    help="model.gates.alpha_grad: every ∇α inside the flush, or a pass per task")
    ap.add_argument("--thp", default="off", choices=["on", "off", "both"],
                    help="THP_MEM_ALLOC_ENABLE of the children (torch's large CPU blocks on transparent huge "
                         "pages; off, as in training); with --rounds, both alternates on and off")
    ap.add_argument("--no-gate-profile", action="store_true", help="skip the profiled gate-pass step")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 8], help="SMAT expert counts (M) to measure")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, backbone, experts = args.child.split(":")
        import torch

        torch.set_num_threads(args.threads)
        if not args.no_gate_profile:
            enable_kernel_ranges()
        print(json.dumps(run_one(kind, backbone, int(experts), args)))
        return
    import smat_dist  # the environment a training process runs with (PROCESS_ENV), for the children too

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.thp != "both":
        env["THP_MEM_ALLOC_ENABLE"] = "1" if args.thp == "on" else "0"  # torch's default: off
    rows = {}
    failed = []
    passthrough = ["--threads", str(args.threads), "--repeats", str(args.repeats), "--tasks-per-step",
                   str(args.tasks_per_step), "--device", args.device, "--precision", args.precision, "--image-size",
                   str(args.image_size), "--episode", args.episode, "--gate-kernel", args.gate_kernel, "--alpha-grad", args.alpha_grad] + (["--no-gate-profile"] if args.no_gate_profile else [])
    if args.rounds:
        interleaved_rounds(args, env, passthrough)
        return
    kinds = [("protonet", 0)] + [("smat", m) for m in args.experts]
    for backbone in args.backbones:
        for kind, experts in kinds:
            name = f"{backbone} {kind} M={experts}"
            cmd = [sys.executable, __file__, "--child", f"{kind}:{backbone}:{experts}", *passthrough]
            res, err = run_child(cmd, env)
            if res is None:
                print(f"  FAILED   {name} {err}", file=sys.stderr, flush=True)
                failed.append(dict(kind=kind, backbone=backbone, experts=experts, error=err[-2000:]))
            else:
                rows[(backbone, kind, experts)] = res
                print(f"  measured {name}: {describe(res)}", flush=True)
            if args.json:  # what has finished so far, in case a later configuration takes the machine down
                tmp = args.json + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(list(rows.values()) + failed, f, indent=1)
                os.replace(tmp, args.json)
    ways, shots, queries = EPISODES[args.episode]
    print()
    print(f"{ways}-way {shots}-shot {queries}-query, {args.image_size} px, {args.precision}, {args.device}, "
          f"{args.threads} threads, {args.tasks_per_step} tasks per meta-step")
    print(f"{'backbone':9s} {'M':>2s} {'SMAT s/task':>12s} {'ProtoNet s':>11s} {'SMAT/ProtoNet':>14s} "
          f"{'M/M1':>6s} {'peak RSS GB':>12s}")
    for backbone in args.backbones:
        pn = rows.get((backbone, "protonet", 0))
        m1 = rows.get((backbone, "smat", min(args.experts)))
        for experts in args.experts:
            r = rows.get((backbone, "smat", experts))
            if r is None:
                print(f"{backbone:9s} {experts:2d} {'failed':>12s}")
                continue
            vs_pn = f"{r['sec_per_task'] / pn['sec_per_task']:14.2f}" if pn else f"{'-':>14s}"
            ratio_m = f"{r['sec_per_task'] / m1['sec_per_task']:6.2f}" if m1 else f"{'-':>6s}"
            pn_s = f"{pn['sec_per_task']:11.3f}" if pn else f"{'-':>11s}"
            print(f"{backbone:9s} {experts:2d} {r['sec_per_task']:12.3f} {pn_s} {vs_pn} {ratio_m} "
                  f"{r['peak_rss_gb']:12.2f}")
        if pn:
            print(f"{backbone:9s} ProtoNet peak RSS {pn['peak_rss_gb']:.2f} GB")
    print_gate_table(rows, args.backbones)
    if failed:
        print(f"{len(failed)} configuration(s) failed: " + ", ".join(f"{f['backbone']} {f['kind']} M={f['experts']}"
                                                                   for f in failed))
        sys.exit(1)


def describe(res: dict) -> str:
    """One measured row as text: time, FLOPs, MFU and peaks where known."""
    text = (f"{res['sec_per_task']:.4f} s/task ({res['tasks_per_s']:.2f}/s), {res['tflop_per_task']:.4f} TFLOP/task "
            f"({res['achieved_tflops']:.3f} TFLOP/s), peak RSS {res['peak_rss_gb']:.2f} GB")
    if res.get("mfu") is not None:
        text += f", MFU {100 * res['mfu']:.1f} % of {res['peak_tflops']:.0f}"
    if res.get("peak_gpu_gb") is not None:
        text += f", peak GPU {res['peak_gpu_gb']:.2f} GB allocated / {res['peak_reserved_gb']:.2f} GB reserved"
    return text


if __name__ == "__main__":
    main()
