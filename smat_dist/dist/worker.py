"""The per-worker meta-training loop that Ray Train runs on every rank.

Each rank builds the same SMAT module (same seed, same θ_pre, checked), wraps it in a DeepSpeed
engine and runs *whole tasks* from its own slice of the global episode sequence: meta-step ``s``
owns episodes ``s·B .. (s+1)·B-1`` and rank ``r`` of ``W`` takes every W-th of them
(:func:`smat_dist.data.loader.rank_indices`). Hypernetwork, inner step, dense teacher and
distillation of a task all happen on its rank, so teacher work is spread over the workers; the
engine accumulates the rank's tasks and averages the meta-gradients over ranks.

Global state stays identical everywhere by construction and is verified every step: the gates
are drawn from ``(seed, step)``, λ is a parameter updated from all-reduced gradients and reset by
the (identical) measured sparsity, the selection temperature is a function of the global task
index, and the task counter advances by the global ``B``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from smat_dist.config import RunConfig, from_dict, to_dict

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (``dist.fault_at_step``)."""


def _episode_stream(cfg: RunConfig, start_step: int, total: int, rank: int, world: int):
    from smat_dist.data.loader import rank_indices

    B = cfg.train.tasks_per_step
    indices = rank_indices(start_step, B, rank, world, num_steps=max(0, total - start_step))
    if cfg.dist.episodes == "toy":
        from smat_dist.smat.toy import ToyEpisodes

        provider = ToyEpisodes(num_classes=20, image_size=cfg.model.backbone.img_size, ways=5, shots=3,
                               queries=4, seed=cfg.train.seed)
        return provider.iterate(indices), None
    from smat_dist.data.loader import EpisodeLoader

    loader = EpisodeLoader(cfg.data, split="train", seed=cfg.train.seed, use_ray=True)
    return loader.iterate(indices), loader


def _global_state(model, metrics: Dict[str, Any], step: int) -> torch.Tensor:
    """Everything that must agree across ranks, as one vector (λ, T, sparsity, counters, params)."""
    parts: List[torch.Tensor] = [torch.tensor([float(step), float(model.tasks_seen)], dtype=torch.float64)]
    for key in ("lambda", "sparsity", "temperature"):
        if key in metrics:
            parts.append(torch.as_tensor(metrics[key], dtype=torch.float64).reshape(-1))
    with torch.no_grad():  # a cheap fingerprint of every trainable tensor
        for p in model.parameters():
            parts.append(p.detach().double().sum().reshape(1))
    return torch.cat(parts)


def _alpha_by_source(per_task: List, sources: List[str], num_experts: int, engine_mod) -> Dict[str, List[float]]:
    """Mean α per training source over all ranks' tasks of the step (for α-usage monitoring)."""
    rows = torch.full((len(per_task), 1 + num_experts), -1.0, dtype=torch.float64)
    for i, (src, alpha) in enumerate(per_task):
        rows[i, 0] = float(sources.index(src)) if src in sources else -1.0
        rows[i, 1:] = torch.tensor(alpha, dtype=torch.float64)
    allrows = engine_mod.all_gather_rows(rows)
    out = {}
    for j, name in enumerate(sources):
        sel = allrows[allrows[:, 0] == j, 1:]
        if len(sel):
            out[name] = sel.mean(0).tolist()
    return out


def train_loop(config: Dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    import ray.train

    from smat_dist.dist import engine as E
    from smat_dist.monitoring.recorder import worker_monitor
    from smat_dist.smat import SMAT
    from smat_dist.smat.optim import apply_schedule, build_optimizer
    from smat_dist.smat.trainer import meta_step

    cfg: RunConfig = from_dict(RunConfig, config["run"])
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    B = cfg.train.tasks_per_step
    if B % world:
        raise ValueError(f"train.tasks_per_step={B} is not a multiple of the {world} workers")
    tpw = B // world
    total = cfg.train.total_steps()
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    import ray.train.torch as rtt

    device = rtt.get_device() if cfg.dist.use_gpu else torch.device("cpu")

    torch.manual_seed(cfg.train.seed)  # identical θ_pre (random backbones) and init on every rank
    with E.rank_zero_first():  # rank 0 fills any weight cache first
        model = SMAT(cfg.model)
    model.to(device)
    E.check_same_everywhere("θ_pre (backbone weights)", model.space.fingerprint())
    opt = build_optimizer(model.trainable_parameters(), cfg.model.optim, cfg.model.lagrangian.lr,
                          cfg.model.lagrangian.project_nonneg)
    engine, ds_opt = E.initialize(model, opt, cfg.dist, tpw)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()  # this run's own latest (restart or re-run)
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(path=config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = _read_meta(d)
            _check_resumable(meta, cfg, world, model.space.fingerprint())
            client = E.load_checkpoint(engine, d, meta.get("tag"))
        start_step = int(client["step"])
        if rank == 0:
            print(f"[smat-train] resumed from {checkpoint.path} at step {start_step}/{total} "
                  f"(written by {meta.get('world_size')} workers, now {world})", flush=True)

    stream, loader = _episode_stream(cfg, start_step, total, rank, world)
    monitor = worker_monitor(cfg, rank)  # Prometheus metrics of every step (Ray application metrics)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
    sources = sorted(loader.sources) if loader is not None else ["toy"]
    fault_marker = run_dir / f".fault_injected_step_{cfg.dist.fault_at_step}"
    t_run = time.perf_counter()
    try:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            epoch = (step * B) // cfg.train.tasks_per_epoch
            mult = apply_schedule(ds_opt, epoch, cfg.model.optim)
            t_reduce = [0.0]

            def backward(loss: torch.Tensor) -> None:
                engine.backward(loss)
                t = time.perf_counter()
                engine.step()  # the optimiser steps (after the all-reduce) at the last task only
                t_reduce[0] += time.perf_counter() - t

            m = meta_step(model, stream, tpw, B, step, cfg.train, backward)
            if cfg.dist.fault_at_step is not None and step + 1 == cfg.dist.fault_at_step and rank == cfg.dist.fault_rank:
                if not fault_marker.exists():  # once: the restarted group must get past it
                    fault_marker.parent.mkdir(parents=True, exist_ok=True)
                    fault_marker.write_text(str(step))
                    raise InjectedFault(f"injected fault on rank {rank} at step {step + 1}")
            per_task = m.pop("_per_task")
            state = _global_state(model, m, step)
            spread = (E.all_gather_rows(state.unsqueeze(0)) - state).abs().max()
            keys = sorted(k for k, v in m.items() if isinstance(v, (int, float)) or
                          (isinstance(v, list) and v and isinstance(v[0], (int, float))))
            m = E.mean_over_ranks(m, keys)
            m["alpha_by_source"] = _alpha_by_source(per_task, sources, model.num_experts, E) if per_task else {}
            if loader is not None:
                m["data"] = loader.stats()
            elapsed = time.perf_counter() - t0
            m.update(step=step + 1, lr_mult=mult, world_size=world, tasks_per_s=B / elapsed, time_step=elapsed,
                     time_allreduce_step=t_reduce[0], global_state_max_spread=float(spread),
                     grad_norms=dict(getattr(opt, "last_grad_norms", {})))
            monitor.record_step(m, rank=rank)
            last = step + 1 == total
            if rank == 0 and ((step + 1) % cfg.train.log_every == 0 or last):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                _progress(m, total, time.perf_counter() - t_run, step + 1 - start_step)
            scalars = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            if (step + 1) % cfg.train.checkpoint_every == 0 or last:
                _report_with_checkpoint(engine, model, cfg, scalars, step + 1, world, rank, last, run_dir)
            elif (step + 1) % cfg.train.log_every == 0:
                ray.train.report(scalars)
    finally:
        if loader is not None:
            loader.close()
    E.barrier()


def _progress(m: Dict[str, Any], total: int, elapsed: float, done: int) -> None:
    eta = elapsed / max(1, done) * (total - m["step"])
    sp = m.get("sparsity")
    sp_txt = f" sparsity {sum(sp) / len(sp):.3f}" if isinstance(sp, list) else ""
    print(f"[smat-train] step {m['step']}/{total} loss {m.get('loss', float('nan')):.4f} "
          f"query acc {m.get('query_acc', float('nan')):.3f}{sp_txt} {m['tasks_per_s']:.2f} tasks/s "
          f"eta {eta / 60:.1f} min", flush=True)


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop metric lines of steps that will be re-run (nothing is lost or doubled)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start_step]
    path.write_text("".join(line + "\n" for line in keep))


META_FILE = "smat_checkpoint.json"


def _read_meta(directory: str) -> Dict[str, Any]:
    p = Path(directory) / META_FILE
    if not p.exists():
        raise FileNotFoundError(f"{directory} is not a smat-dist checkpoint (no {META_FILE})")
    return json.loads(p.read_text())


def _check_resumable(meta: Dict[str, Any], cfg: RunConfig, world: int, fingerprint: str) -> None:
    if meta.get("theta_pre") != fingerprint:
        raise ValueError(
            f"checkpoint was trained on other pre-trained weights (θ_pre fingerprint {meta.get('theta_pre')} "
            f"!= {fingerprint}); check model.backbone.checkpoint"
        )
    if meta.get("tasks_per_step") != cfg.train.tasks_per_step:
        raise ValueError(
            f"checkpoint used train.tasks_per_step={meta.get('tasks_per_step')}, this run "
            f"{cfg.train.tasks_per_step}: the episode stream and schedule would not continue; keep it equal"
        )
    if meta.get("world_size") != world and int(meta.get("zero_stage", 0)) > 0:
        raise ValueError(
            f"checkpoint holds ZeRO-{meta['zero_stage']} optimizer partitions of {meta['world_size']} workers; "
            f"resume with dist.num_workers={meta['world_size']}. To change the worker count, resume with "
            f"that count and dist.zero_stage=0 once, let it write a checkpoint (ZeRO-0 checkpoints hold "
            f"the whole optimizer state), then resume that on any number of workers"
        )


def _report_with_checkpoint(engine, model, cfg: RunConfig, scalars, step: int, world: int, rank: int, final: bool,
                            run_dir: Path) -> None:
    import ray.train
    from ray.train import Checkpoint

    from smat_dist.dist import engine as E
    from smat_dist.export import export_model

    tag = f"step_{step:08d}"
    tmp = tempfile.mkdtemp(prefix="smat-ckpt-")
    try:
        meta = {"tag": tag, "step": step, "tasks_per_step": cfg.train.tasks_per_step, "world_size": world,
                "zero_stage": cfg.dist.zero_stage, "theta_pre": model.space.fingerprint()}
        E.save_checkpoint(engine, tmp, tag, client_state={"step": step})
        if rank == 0:
            (Path(tmp) / META_FILE).write_text(json.dumps(meta))
            if final:
                export_model(model, Path(tmp) / EXPORT_NAME, cfg.train, extra={"run_config": json.dumps(to_dict(cfg))})
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(tmp) / EXPORT_NAME, run_dir / EXPORT_NAME)
        E.barrier()
        ray.train.report(scalars, checkpoint=Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
