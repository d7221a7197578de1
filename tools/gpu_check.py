#!/usr/bin/env python
"""The measuring steps of ``tools/gpu_check.sh`` that are Python: each appends JSON lines to RESULTS.

    python tools/gpu_check.py facts RESULTS DEVICE             # torch/CUDA/NCCL facts
    torchrun --nproc-per-node 1 tools/gpu_check.py nccl RESULTS DEVICE   # one plain all-reduce, timed
    python tools/gpu_check.py precision RESULTS DEVICE [--tiny] # bf16 vs fp32 of one SMAT M=8 task
    python tools/gpu_check.py summary RESULTS                   # the results as text

``precision``: one ViT-S/16 (``--tiny``: a 1-block ViT) SMAT task with M=8 experts at 128 px
(``--tiny``: 32 px) on 10-way 5-shot 10-query, run from the same parameters and the same draws (gate
noise, α noise) three times: fp32, fp32 again (the noise floor: non-deterministic kernels), bf16. For
the loss and for each gradient group (θδ, mask logits, hypernetwork) it reports the difference to the
first fp32 run: relative error ``|a - b| / |b|`` and cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path


def emit(results: str, row: dict) -> None:
    """One measured result, appended at once (a later hang loses nothing measured)."""
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def cmd_facts(a) -> int:
    import torch

    facts = {"step": "cuda facts", "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
             "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 1024**3, 1),
                     multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                     nccl=".".join(map(str, torch.cuda.nccl.version())), device_count=torch.cuda.device_count())
    emit(a.results, facts)
    return 0 if facts["cuda_available"] or a.device == "cpu" else 1


def cmd_nccl(a) -> int:
    """All-reduce of 64 MB (NCCL on the GPU, gloo on CPU) in the process group torchrun set up."""
    import torch
    import torch.distributed as dist

    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    x = torch.ones(16 * 1024 * 1024, device="cuda" if cuda else "cpu")  # 64 MB fp32
    dist.all_reduce(x)  # warm-up (communicator set-up)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    ok = bool(torch.allclose(x, torch.full_like(x, float(dist.get_world_size() ** 6))))
    if dist.get_rank() == 0:
        emit(a.results, {"step": "all-reduce", "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                         "megabytes": 64, "seconds": dt, "correct": ok})
    dist.destroy_process_group()
    return 0 if ok else 1


def _one_task(model, episode, precision: str, state: dict):
    """Loss and gradients of one meta-training task from ``state`` under ``precision``."""
    import torch

    model.load_state_dict(state)
    model.cfg.precision = precision
    model.zero_grad(set_to_none=True)
    ctx = model.begin_step(7, 11, tasks=1)
    out = model(episode, ctx, task_index=episode.index, last=True)
    out.loss.backward()
    groups = model.trainable_parameters()
    grads = {}
    for name, key in (("theta_delta", "delta"), ("mask_logits", "masks"), ("hypernetwork", "hypernet")):
        parts = [p.grad.detach().double().reshape(-1) for p in groups[key] if p.grad is not None]
        if parts:
            grads[name] = torch.cat(parts)
    return out.loss.detach().double(), grads


def _compare(loss, grads, ref_loss, ref_grads) -> dict:
    import torch

    row = {"loss_abs_diff": float((loss - ref_loss).abs()),
           "loss_rel_err": float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30))}
    for name, g in grads.items():
        r = ref_grads[name]
        row[f"{name}_rel_err"] = float((g - r).norm() / r.norm().clamp_min(1e-30))
        row[f"{name}_cosine"] = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
    return row


def cmd_precision(a) -> int:
    import torch

    from smat_dist.episode import Episode
    from smat_dist.smat import SMAT, ModelConfig
    from smat_dist.smat.config import BackboneConfig, GateConfig

    device = torch.device(a.device)
    if a.tiny:
        spec = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    else:
        spec = dict(name="vit_small_patch16_224", img_size=128)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(**spec), gates=GateConfig(num_experts=8), precision="fp32")
    model = SMAT(cfg).to(device)
    with torch.no_grad():  # a trained-looking state: a non-zero offset, so that θδ and the masks matter
        model.delta.normal_(0.0, 1e-3)
    state = copy.deepcopy(model.state_dict())
    ways, shots, queries, size = 10, 5, 10, spec["img_size"]
    g = torch.Generator().manual_seed(0)
    episode = Episode(support_x=torch.randn(ways * shots, 3, size, size, generator=g),
                      support_y=torch.arange(ways).repeat_interleave(shots),
                      query_x=torch.randn(ways * queries, 3, size, size, generator=g),
                      query_y=torch.arange(ways).repeat_interleave(queries), index=3).to(device)
    ref_loss, ref_grads = _one_task(model, episode, "fp32", state)
    floor = _compare(*_one_task(model, episode, "fp32", state), ref_loss, ref_grads)
    bf16 = _compare(*_one_task(model, episode, "bf16", state), ref_loss, ref_grads)
    base = {"step": "bf16 vs fp32", "backbone": spec["name"], "image_size": size, "experts": 8,
            "episode": "10w5s10q", "device": a.device, "fp32_loss": float(ref_loss)}
    emit(a.results, {**base, "compare": "fp32 vs fp32 (noise floor)", **floor})
    emit(a.results, {**base, "compare": "bf16 vs fp32", **bf16})
    print(f"\nbf16 vs fp32, one SMAT M=8 task ({spec['name']}, {size} px, {a.device}); fp32 loss {float(ref_loss):.5f}")
    print(f"{'':24s} {'loss rel err':>13s} " + " ".join(f"{n + ' rel/cos':>26s}" for n in ref_grads))
    for label, row in (("fp32 vs fp32 (floor)", floor), ("bf16 vs fp32", bf16)):
        cells = " ".join(f"{row[n + '_rel_err']:>14.3g} {row[n + '_cosine']:>11.6f}" for n in ref_grads)
        print(f"{label:24s} {row['loss_rel_err']:>13.3g} {cells}")
    finite = all(v == v for v in bf16.values())  # no NaN
    return 0 if finite else 1


def cmd_summary(a) -> int:
    path = Path(a.results)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for r in rows:
        step = r.get("step")
        if step == "bench" and "error" in r:
            print(f"bench {r['backbone']} {r['kind']} M={r['experts']}: FAILED: {r['error'].splitlines()[-1]}")
        elif step == "bench":
            mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
            gpu = (f", peak {r['peak_gpu_gb']:.2f} GB alloc / {r['peak_reserved_gb']:.2f} GB reserved"
                   if r.get("peak_gpu_gb") is not None else "")
            print(f"bench {r['episode']:8s} {r['backbone']} {r['kind']:8s} M={r['experts']}: "
                  f"{r['sec_per_task'] * 1000:.1f} ms/task, {r['tasks_per_s']:.2f} tasks/s, "
                  f"{r['tflop_per_task']:.3f} TFLOP/task{mfu}{gpu}")
        elif step == "bf16 vs fp32":
            groups = ", ".join(f"{k[:-8]} {r[k]:.2g}/{r[k[:-8] + '_cosine']:.5f}" for k in r if k.endswith("_rel_err")
                               and not k.startswith("loss"))
            print(f"{r['compare']}: loss rel err {r['loss_rel_err']:.2g}; grad rel err/cos: {groups}")
        elif step == "eval":
            print(f"eval {r['precision']}: " + ", ".join(f"{x['source']} {float(x['accuracy']):.2f}" for x in r["rows"]))
        elif step == "result":
            print(f"{r['status'].upper():4s} {r['name']} ({r['seconds']} s)")
        else:
            print(json.dumps(r))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["facts", "nccl", "precision", "summary"])
    ap.add_argument("results")
    ap.add_argument("device", nargs="?", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    return {"facts": cmd_facts, "nccl": cmd_nccl, "precision": cmd_precision, "summary": cmd_summary}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
