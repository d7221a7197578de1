"""Single-process SMAT meta-trainer with exact resume.

Everything random is a function of ``(seed, step)`` (gate noise) or ``(seed, task index)``
(episode, hypernetwork noise), and the LR schedule is a function of the step, so a checkpoint
needs only the module and optimiser state and the step to continue bit-identically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol

import torch

from smat_dist.config import TrainConfig, to_dict
from smat_dist.episode import Episode
from smat_dist.smat.meta_arch import SMAT, TaskOutput
from smat_dist.smat.optim import apply_schedule, build_optimizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "smat-dist-checkpoint-v1"


class EpisodeProvider(Protocol):
    def iterate(self, indices: Iterable[int]) -> Iterator[Episode]: ...


def summarise(outputs: List[TaskOutput]) -> Dict[str, object]:
    """Mean of every per-task metric over the step's tasks (vectors stay vectors)."""
    out: Dict[str, object] = {}
    keys = {k for o in outputs for k in o.metrics}
    for k in sorted(keys):
        if k in ("alpha", "source"):
            continue
        vals = [o.metrics[k].float() for o in outputs if k in o.metrics]
        mean = torch.stack(vals).mean(0)
        out[k] = mean.tolist() if mean.ndim else float(mean)
    alphas = [o.metrics["alpha"] for o in outputs if "alpha" in o.metrics]
    if alphas:
        out["alpha_mean"] = torch.stack(alphas).float().mean(0).tolist()
    return out


def tensor_dict_to_json(d: Dict[str, torch.Tensor]) -> Dict[str, object]:
    return {k: (v.tolist() if v.ndim else float(v)) for k, v in d.items() if v is not None}


class NonFiniteLoss(RuntimeError):
    pass


def meta_step(
    model: SMAT,
    episodes: Iterator[Episode],
    local_tasks: int,
    global_tasks: int,
    step: int,
    cfg: TrainConfig,
    backward: Callable[[torch.Tensor], None],
) -> Dict[str, object]:
    """The tasks of one meta-step on this process: forward and ``backward`` each, no optimiser step.

    Shared by the single-process trainer (``backward`` = loss/B backward) and every distributed
    worker (``backward`` = the DeepSpeed engine's). ``global_tasks`` advances the task counter.
    """
    model.train()
    device = model.device
    ctx = model.begin_step(step, cfg.seed, tasks=local_tasks)
    outputs: List[TaskOutput] = []
    t_data = t_fwd = t_bwd = 0.0
    for j in range(local_tasks):
        t0 = time.perf_counter()
        ep = next(episodes).to(device)
        t1 = time.perf_counter()
        out = model(ep, ctx, task_index=ep.index, last=(j == local_tasks - 1))
        t2 = time.perf_counter()
        if cfg.stop_on_nonfinite and not torch.isfinite(out.loss):
            raise NonFiniteLoss(f"step {step}, task {ep.index}: loss is {float(out.loss)}")
        backward(out.loss)
        t3 = time.perf_counter()
        out.metrics["source"] = ep.source  # type: ignore[assignment]
        outputs.append(out)
        t_data, t_fwd, t_bwd = t_data + t1 - t0, t_fwd + t2 - t1, t_bwd + t3 - t2
    model.end_step(global_tasks)
    metrics = summarise(outputs)
    metrics.update(tensor_dict_to_json(model.step_metrics(ctx)))
    teacher = float(metrics.get("time_teacher", 0.0)) * local_tasks
    metrics.update(time_data=t_data, time_student=t_fwd - teacher, time_teacher=teacher, time_backward=t_bwd)
    metrics["_per_task"] = [(o.metrics["source"], o.metrics["alpha"].tolist()) for o in outputs if "alpha" in o.metrics]
    return metrics


class Trainer:
    def __init__(self, model: SMAT, cfg: TrainConfig, run_dir: Optional[str | Path] = None):
        self.model = model
        self.cfg = cfg
        mc = model.cfg
        self.opt = build_optimizer(model.trainable_parameters(), mc.optim, mc.lagrangian.lr, mc.lagrangian.project_nonneg)
        self.step = 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ one meta-step
    def epoch_of(self, step: int) -> int:
        return (step * self.cfg.tasks_per_step) // self.cfg.tasks_per_epoch

    def train_step(self, episodes: Iterable[Episode], count: Optional[int] = None) -> Dict[str, object]:
        """One optimiser step over ``count`` episodes (their ``index`` is the global task index)."""
        if count is None:
            episodes = list(episodes)
            count = len(episodes)
        B = count
        mult = apply_schedule(self.opt, self.epoch_of(self.step), self.model.cfg.optim)
        metrics = meta_step(self.model, iter(episodes), B, B, self.step, self.cfg, lambda loss: (loss / B).backward())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        metrics.update(step=self.step, lr_mult=mult)
        metrics.update({f"grad_norm_{k}": v for k, v in self.opt.last_grad_norms.items()})
        self.step += 1
        return metrics

    def fit(
        self,
        provider: EpisodeProvider,
        steps: Optional[int] = None,
        on_step: Optional[Callable[[Dict[str, object]], None]] = None,
    ) -> None:
        """Train until ``steps`` (default: the config's total), checkpointing as configured."""
        total = self.cfg.total_steps() if steps is None else steps
        B = self.cfg.tasks_per_step
        metrics_file = (self.run_dir / "metrics.jsonl").open("a") if self.run_dir else None
        stream = provider.iterate(range(self.step * B, total * B))
        try:
            while self.step < total:
                t0 = time.perf_counter()
                m = self.train_step(stream, B)
                m["tasks_per_s"] = B / max(1e-9, time.perf_counter() - t0)
                m.pop("_per_task", None)
                if metrics_file and (self.step % self.cfg.log_every == 0 or self.step == total):
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                if on_step:
                    on_step(m)
                if self.run_dir and (self.step % self.cfg.checkpoint_every == 0 or self.step == total):
                    self.save(self.run_dir / "checkpoints" / f"step_{self.step:08d}.pt")
        finally:
            if metrics_file:
                metrics_file.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "model_config": to_dict(self.model.cfg),
            "train_config": to_dict(self.cfg),
            "theta_pre_fingerprint": self.model.space.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a smat-dist checkpoint (format={state.get('format')!r})")
        fp = self.model.space.fingerprint()
        if state["theta_pre_fingerprint"] != fp:
            raise ValueError(
                f"checkpoint was trained on other pre-trained weights (θ_pre fingerprint "
                f"{state['theta_pre_fingerprint']} != {fp}); check backbone.checkpoint"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        self._prune(path.parent)
        return path

    def _prune(self, folder: Path) -> None:
        keep = self.cfg.keep_checkpoints
        if keep and keep > 0:
            for old in sorted(folder.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)

    def load(self, path: str | Path) -> None:
        state = torch.load(str(path), map_location=self.model.device, weights_only=True)
        self.load_state_dict(state)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = sorted(Path(run_dir).glob("checkpoints/step_*.pt"))
    return found[-1] if found else None


def count_trainable(model: SMAT) -> Dict[str, int]:
    groups = model.trainable_parameters()
    out = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    out["total"] = sum(out.values())
    out["theta_pre"] = model.space.numel
    return out


__all__ = ["Trainer", "latest_checkpoint", "count_trainable", "summarise"]
