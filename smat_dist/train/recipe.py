"""The meta-training recipe: one class every launcher runs, on every rank.

``MetaTrainRecipe(cfg, runtime, run_dir).setup()`` builds the model, optimiser groups and engine,
resumes, and opens the episode stream; ``train()`` runs the meta-steps, logs, checkpoints and exports.
The launchers (:mod:`smat_dist.train.launch` for one process and torchrun, :mod:`smat_dist.train.ray_launcher`
for Ray Train) only say where this process is (:class:`~smat_dist.train.distributed.Runtime`), which
engine it uses and how a checkpoint is published.

Task parallelism: meta-step ``s`` owns global episodes ``s·B .. (s+1)·B-1`` and rank ``r`` of ``W``
runs every W-th of them whole (hypernetwork, inner step, dense teacher, distillation, backward), so
teacher work is spread over the ranks; any B >= W works (ranks take ⌈B/W⌉ or ⌊B/W⌋ tasks) and the
engine weights the meta-gradient so that it is the mean over the B tasks, as on one rank.

Global state stays identical on every rank by construction and is verified every step: gates are
drawn from ``(seed, step)``, λ is a parameter updated from all-reduced gradients and reset by the
(identical) measured sparsity, the selection temperature is a function of the global task index, and
the task counter advances by ``B``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, List, Optional, Protocol

import torch

from smat_dist.config import RunConfig, to_dict
from smat_dist.data.loader import EpisodeLoader, rank_indices, tasks_of_rank
from smat_dist.errors import ConfigError
from smat_dist.episode import Episode
from smat_dist.export import export_model
from smat_dist.monitoring.recorder import StepMonitor, worker_monitor
from smat_dist.record import TASK_KEYS, MetricsLog, StepMetrics, TaskRecord
from smat_dist.smat import SMAT
from smat_dist.smat.optim import SMATOptimizer, apply_schedule, build_optimizer
from smat_dist.smat.timing import StepTimer
from smat_dist.smat.toy import ToyEpisodes
from smat_dist.train import checkpoint as ckpt
from smat_dist.train import distributed, runlog
from smat_dist.train.config import uneven_zero_error
from smat_dist.train.distributed import Runtime
from smat_dist.train.engine import DeepSpeedEngine, Engine, LocalEngine
from smat_dist.train.prefetch import Prefetched

log = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_CHUNK = 1 << 20  # elements per fingerprint chunk: O(1) extra memory in |θ|


class EpisodeProvider(Protocol):
    def iterate(self, indices: Iterable[int]) -> Iterator[Episode]: ...


class NonFiniteLoss(RuntimeError):
    pass


class InjectedFault(RuntimeError):
    """Raised by the test hook ``debug.fault_at_step``."""


class CheckpointSink(Protocol):
    """How a launcher publishes a checkpoint the engine has written (every rank calls ``save``)."""

    def save(self, recipe: "MetaTrainRecipe", step: int, metrics: StepMetrics, final: bool) -> None: ...


def open_episodes(cfg: RunConfig, indices: Iterable[int], *, use_ray: bool, device: Optional[torch.device] = None):
    """(episode iterator, loader or None) for the run's training stream, with tensors on ``device``."""
    if cfg.data.episodes == "toy":
        toy = ToyEpisodes(num_classes=20, image_size=cfg.model.backbone.img_size, ways=5, shots=3, queries=4,
                          seed=cfg.train.seed)
        return toy.iterate(indices), None

    loader = EpisodeLoader(cfg.data, split="train", seed=cfg.train.seed, use_ray=use_ray, device=device)
    return loader.iterate(indices), loader


def rank_monitor(cfg: RunConfig, rank: int, *, default_backend: str) -> StepMonitor:
    """This rank's metrics monitor (:mod:`smat_dist.monitoring`), from the run config."""
    gates = cfg.model.gates
    return worker_monitor(cfg.monitor, run=cfg.train.run_name, rank=rank,
                          target_sparsity=gates.target_sparsity if gates.enabled else None,
                          default_backend=default_backend)


def summarise(outputs: List[dict]) -> dict:
    """Mean over the step's tasks of every per-task value the model reported, read to the host at once."""
    keys = sorted({k for o in outputs for k in o})
    unknown = [k for k in keys if k not in TASK_KEYS and k != "alpha"]
    if unknown:
        raise KeyError(f"the model reported task metrics StepMetrics does not know: {unknown}")
    if not keys:
        return {}
    means = [torch.stack([o[k].float().reshape(-1) for o in outputs if k in o]).mean(0) for k in keys]
    flat = torch.cat([m.to(means[0].device) for m in means]).tolist()  # the step's one read of task metrics
    out: dict = {}
    i = 0
    for k, mean in zip(keys, means):
        n = mean.numel()
        out["alpha_mean" if k == "alpha" else k] = flat[i:i + n] if k == "alpha" else flat[i]
        i += n
    return out


def meta_step(model: SMAT, episodes: Iterator[Episode], *, local_tasks: int, global_tasks: int, step: int,
              seed: int, engine: Engine, stop_on_nonfinite: bool = True, logged: bool = True) -> StepMetrics:
    """This rank's tasks of meta-step ``step``: forward and backward each, then the engine's step.
    ``global_tasks`` (all ranks) advances the task counter that drives the selection temperature.

    Nothing in the task loop waits for the device: each task's finiteness, α and metrics stay tensors,
    the phase times are CUDA events (:class:`~smat_dist.smat.timing.StepTimer`), and all of it is read
    once, after the gradients are reduced and before the optimiser step (a non-finite loss on any rank
    stops every rank before the parameters change). ``logged``: the step's metrics are written, so
    the diagnostics that cost a pass over the gates (test-gate sparsity) are measured too."""
    model.train()
    device = model.device
    step_ctx = model.begin_step(step, seed, tasks=local_tasks)
    timer = step_ctx.timer = StepTimer(device)
    outputs: List[dict] = []
    finite: List[torch.Tensor] = []
    sources: List[str] = []
    indices: List[int] = []
    for j in range(local_tasks):
        t0 = timer.mark()
        ep = next(episodes).to(device)
        t1 = timer.add("data", t0)
        out = model(ep, step_ctx, task_index=ep.index, last=(j == local_tasks - 1))
        t2 = timer.add("forward", t1)
        if stop_on_nonfinite:
            finite.append(torch.isfinite(out.loss.detach()))
        engine.backward(out.loss)
        timer.add("backward", t2)
        sources.append(ep.source)
        indices.append(ep.index)
        outputs.append(out.metrics)
    step_ctx.constraint()  # settled by the first merge; a rank without tasks counts the draw here, before λ steps
    t3 = timer.mark()
    engine.complete_backward()  # same collectives on every rank before the check's own
    if stop_on_nonfinite:
        _check_finite(finite, outputs, indices, step)
    engine.finish_step()
    timer.add("reduce", t3)
    model.end_step(global_tasks)
    m = StepMetrics(**summarise(outputs))
    for key, value in model.step_metrics(step_ctx, diagnostics=logged).items():
        setattr(m, "lagrange" if key == "lambda" else key, value.tolist() if value.ndim else float(value))
    times = timer.totals()
    teacher = times.get("teacher")
    m.time_data, m.time_student = times.get("data", 0.0), times.get("forward", 0.0) - (teacher or 0.0)
    m.time_backward = times.get("backward", 0.0) + times.get("reduce", 0.0)  # incl. the engine step
    m.time_teacher = teacher
    m.time_allreduce_step = times.get("reduce", 0.0)
    alphas = m.alpha_mean is not None and [o["alpha"] for o in outputs]
    alpha_rows = torch.stack(alphas).float().tolist() if alphas else [None] * len(sources)
    m.tasks = [TaskRecord(source, alpha) for source, alpha in zip(sources, alpha_rows)]
    return m


def _check_finite(finite: List[torch.Tensor], outputs: List[dict], indices: List[int], step: int) -> None:
    """One read of the step's finiteness flags (and one flag exchanged between ranks): raise on every
    rank if any task's loss is not finite, naming the first such task of this rank."""
    flags = torch.stack(finite).tolist() if finite else []
    bad = [j for j, ok in enumerate(flags) if not ok]
    if distributed.any_rank(bool(bad)):
        if not bad:
            raise NonFiniteLoss(f"meta-step {step + 1}: another rank's loss is not finite")
        j = bad[0]
        raise NonFiniteLoss(f"meta-step {step + 1}, task {indices[j]}: loss is {float(outputs[j]['loss'])}")


def state_fingerprint(model: SMAT, m: StepMetrics) -> torch.Tensor:
    """Everything that must agree across ranks as one small fp64 CPU vector: counters, λ,
    temperature, measured sparsity and a chunked checksum of every trainable tensor (no copy of any)."""
    parts: List[float] = [float(m.step), float(model.tasks_seen)]
    for vec in (m.lagrange, m.sparsity):
        parts += list(vec or [])
    if m.temperature is not None:
        parts.append(m.temperature)
    sums = []
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            total = torch.zeros((), dtype=torch.float64, device=flat.device)
            for chunk in flat.split(STATE_CHUNK):
                total += chunk.sum(dtype=torch.float64)
            sums.append(total)
    state = torch.tensor(parts, dtype=torch.float64)
    if sums:
        state = torch.cat([state, torch.stack(sums).cpu()])
    return state


class MetaTrainRecipe:
    """One rank's meta-training run; see the module docstring."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, run_dir: Optional[str | Path], *,
                 model: Optional[SMAT] = None, episodes: Optional[EpisodeProvider] = None,
                 sink: Optional[CheckpointSink] = None, monitor=None,
                 on_step: Optional[Callable[[StepMetrics], None]] = None, progress: bool = True, store=None):
        self.cfg = cfg
        self.runtime = runtime
        # ``store`` (a RunStore): rank 0 copies the run's files there after each checkpoint and at the end
        self.store = store
        if run_dir is None and store is not None:
            run_dir = store.local
        self.run_dir = Path(run_dir) if run_dir is not None else None  # None: no files (tests, tools)
        self._model = model
        self._provider = episodes
        self.sink = sink
        self.monitor = monitor
        self.on_step = on_step
        self.progress = progress
        self.model: SMAT
        self.optimizer: SMATOptimizer
        self.engine: Engine
        self.step = 0
        self.total = cfg.train.total_steps()
        self.loader = None
        self._stream: Optional[Iterator[Episode]] = None
        self.metrics_log = MetricsLog(self.run_dir / METRICS_FILE) if self.run_dir is not None else None
        B, W = cfg.train.tasks_per_step, runtime.world_size
        if B < W:
            raise ConfigError(f"train.tasks_per_step={B} is smaller than the {W} ranks: {W - B} rank(s) would have "
                              f"no task; use at most {B} ranks or a larger meta-batch")
        if B % W and cfg.dist.zero_stage > 0:
            raise ConfigError(uneven_zero_error(B, W, cfg.dist.zero_stage))
        self.tasks_per_rank = tasks_of_rank(B, runtime.rank, W)  # ⌈B/W⌉ or ⌊B/W⌋

    # ------------------------------------------------------------------------------ setup
    @property
    def engine_kind(self) -> str:
        return "local" if self.runtime.launcher == "local" else "deepspeed"

    def setup(self, resume_dir: Optional[Path] = None) -> "MetaTrainRecipe":
        cfg, rt = self.cfg, self.runtime
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if self._model is None:
            torch.manual_seed(cfg.train.seed)  # identical θ_pre (random backbones) and init on every rank
            with distributed.rank_zero_first():  # rank 0 fills any weight cache first
                self._model = SMAT(cfg.model)
        self.model = self._model.to(rt.device)
        distributed.check_same_everywhere("θ_pre (backbone weights)", self.model.space.fingerprint())
        self.optimizer = build_optimizer(self.model.trainable_parameters(), cfg.model.optim, cfg.model.lagrangian.lr,
                                         cfg.model.lagrangian.project_nonneg)
        if self.engine_kind == "local":
            self.engine = LocalEngine(self.model, self.optimizer, cfg.train.tasks_per_step)
        else:
            self.engine = DeepSpeedEngine(self.model, self.optimizer, zero_stage=cfg.dist.zero_stage,
                                          tasks_per_step=cfg.train.tasks_per_step, world_size=rt.world_size,
                                          settings=cfg.dist.deepspeed)
        if resume_dir is not None:
            self.resume(Path(resume_dir))
        return self

    def resume(self, directory: Path) -> None:
        meta = ckpt.inspect(directory)
        ckpt.check_resumable(meta, directory, tasks_per_step=self.cfg.train.tasks_per_step,
                             world_size=self.runtime.world_size, engine=self.engine_kind,
                             theta_pre=self.model.space.fingerprint())
        self.engine.load(directory, meta.tag)
        self.step = meta.step
        self._stream = None  # a stream opened before started at the old step; reopened by train()
        if self.runtime.is_main:
            self.say(f"resumed from {directory} at step {self.step}/{self.total} (written by {meta.world_size} "
                     f"rank(s), now {self.runtime.world_size})")

    # ------------------------------------------------------------------------------ what launchers may change
    def use_episodes(self, provider: Optional[EpisodeProvider]) -> None:
        """Train on ``provider``'s episodes (None: the run's configured stream), opened at the current step
        by the next :meth:`train`."""
        self._provider, self._stream = provider, None

    def step_on(self, episodes: Iterable[Episode]) -> StepMetrics:
        """One meta-step over exactly ``episodes`` (their ``index`` is the global task index) on a
        single-process run; ``train.tasks_per_step`` becomes their number from here on."""
        episodes = list(episodes)
        if self.runtime.world_size != 1 or self.engine_kind != "local":
            raise RuntimeError("step_on is for a single-process run; ranks step on the run's episode stream")
        self.cfg.train.tasks_per_step = self.tasks_per_rank = len(episodes)
        self.engine.tasks_per_step = len(episodes)
        self._stream = iter(episodes)
        return self.run_step()

    def _open_stream(self) -> None:
        if self._stream is not None:
            return

        B, rt = self.cfg.train.tasks_per_step, self.runtime
        indices = rank_indices(self.step, B, rt.rank, rt.world_size, num_steps=max(0, self.total - self.step))
        if self._provider is not None:
            self._stream = iter(self._provider.iterate(indices))
            self.loader = self._provider if hasattr(self._provider, "stats") else None
        else:
            self._stream, self.loader = open_episodes(self.cfg, indices, use_ray=rt.launcher == "ray", device=rt.device)
        if rt.launcher != "ray":  # Ray's actors build ahead already; here a thread does, as many episodes ahead
            self._stream = Prefetched(self._stream, depth=self.cfg.data.max_in_flight)

    def run(self, resume: ContextManager[Optional[str | Path]]) -> None:
        """What every launcher does on every rank: set up (resuming from the directory ``resume`` yields,
        open only while the state is loaded), train to the end, write the export (rank 0). A failure's
        traceback goes to the run's log file; the monitor is closed either way."""
        try:
            if self.store is not None and self.runtime.is_main:
                self.store.pull(METRICS_FILE, runlog.RUN_LOG)  # a restart on another node continues them
            with resume as directory:
                self.setup(Path(directory) if directory else None)
            self.train()
            if self.runtime.is_main:
                self.export()
                self._push(EXPORT_NAME)
            distributed.barrier()
        except Exception as exc:
            runlog.log_exception(self.run_dir, exc, f"rank {self.runtime.rank}")
            if self.runtime.is_main:
                try:
                    self._push()
                except Exception:  # the upload must not hide the error itself
                    pass
            raise
        finally:
            if self.monitor is not None:
                self.monitor.close()

    # ------------------------------------------------------------------------------ training
    def train(self, steps: Optional[int] = None) -> None:
        """Meta-steps until ``steps`` (default: the config's total)."""
        if steps is not None:
            self.total = steps
        if self.runtime.is_main and self.metrics_log is not None:
            self.metrics_log.truncate_after(self.step)  # lines of steps that will be re-run, torn lines
        self._open_stream()
        t_run = time.perf_counter()
        first = self.step
        try:
            while self.step < self.total:
                m = self.run_step()
                self._log(m, time.perf_counter() - t_run, self.step - first)
                self._checkpoint_and_hooks(m)
        finally:
            if isinstance(self._stream, Prefetched):
                self._stream.close()
                self._stream = None
            if self.loader is not None and self._provider is None:
                self.loader.close()

    def run_step(self) -> StepMetrics:
        """One meta-step on this rank, with the cross-rank bookkeeping; advances ``self.step``."""
        cfg, rt = self.cfg, self.runtime
        B = cfg.train.tasks_per_step
        t0 = time.perf_counter()
        epoch = (self.step * B) // cfg.train.tasks_per_epoch
        lr_mult = apply_schedule(self.optimizer, epoch, cfg.model.optim)
        logged = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == self.total
        m = meta_step(self.model, self._stream, local_tasks=self.tasks_per_rank, global_tasks=B, step=self.step,
                      seed=cfg.train.seed, engine=self.engine, stop_on_nonfinite=cfg.train.stop_on_nonfinite,
                      logged=logged)
        self.step += 1
        m.step, m.lr_mult, m.world_size = self.step, lr_mult, rt.world_size
        self._fault_hook()
        if rt.world_size > 1:
            state = state_fingerprint(self.model, m)
            m.global_state_max_spread = float((distributed.all_gather_rows(state.unsqueeze(0)) - state).abs().max())
        else:
            m.global_state_max_spread = 0.0
        flat, sizes = [], []
        share = self.tasks_per_rank * rt.world_size / B  # task means weighted by this rank's share of the tasks
        for k in averaged_fields(m):
            v = getattr(m, k)
            vals = v if isinstance(v, list) else [v]
            weight = share if k in TASK_MEANS else 1.0
            flat += [float(x) * weight for x in vals]
            sizes.append((k, isinstance(v, list), len(vals)))
        flat = distributed.mean_over_ranks(flat)
        i = 0
        for k, is_list, n in sizes:
            setattr(m, k, flat[i:i + n] if is_list else flat[i])
            i += n
        m.alpha_by_source = self._alpha_by_source(m.tasks)
        if self.loader is not None:
            m.data = dict(self.loader.stats())
        m.grad_norms = dict(self.optimizer.last_grad_norms)
        m.time_step = time.perf_counter() - t0
        m.tasks_per_s = B / max(1e-9, m.time_step)
        return m

    def _alpha_by_source(self, tasks: List[TaskRecord]) -> dict:
        """Mean α per training source over every rank's tasks of the step (α usage by source)."""
        M = self.model.num_experts
        if not tasks or tasks[0].alpha is None:
            return {}
        sources = sorted(self.loader.sources) if self.loader is not None and hasattr(self.loader, "sources") \
            else sorted({t.source for t in tasks})
        # padded to ⌈B/W⌉ rows (source -1, dropped below): every rank gathers the same shape
        per_rank = -(-self.cfg.train.tasks_per_step // self.runtime.world_size)
        rows = torch.full((per_rank, 1 + M), -1.0, dtype=torch.float64)
        for i, t in enumerate(tasks):
            rows[i, 0] = float(sources.index(t.source)) if t.source in sources else -1.0
            rows[i, 1:] = torch.tensor(t.alpha, dtype=torch.float64)
        allrows = distributed.all_gather_rows(rows)
        out = {}
        for j, name in enumerate(sources):
            sel = allrows[allrows[:, 0] == j, 1:]
            if len(sel):
                out[name] = sel.mean(0).tolist()
        return out

    def _fault_hook(self) -> None:
        dbg, rt = self.cfg.debug, self.runtime
        if dbg.fault_at_step is None or self.step != dbg.fault_at_step or rt.rank != dbg.fault_rank:
            return
        if self.run_dir is None:
            raise InjectedFault(f"injected fault (debug.fault_at_step) at step {self.step}")
        marker = self.run_dir / f".fault_injected_step_{dbg.fault_at_step}"
        if marker.exists():  # once: the restarted group must get past it
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(self.step))
        raise InjectedFault(f"injected fault (debug.fault_at_step) on rank {rt.rank} at step {self.step}")

    def debug_kill(self, point: str) -> None:
        """The test hook ``debug.kill_in_checkpoint``: rank 0 dies by SIGKILL at ``point`` of the write of
        that step's checkpoint, once per run directory (a marker file remembers it)."""
        dbg = self.cfg.debug
        if dbg.kill_in_checkpoint != self.step or dbg.kill_point != point or not self.runtime.is_main:
            return
        if self.run_dir is None:
            return
        marker = self.run_dir / f".killed_in_checkpoint_{self.step}_{point}"
        if marker.exists():
            return
        marker.write_text(str(self.step))
        runlog.append(self.run_dir, f"debug.kill_in_checkpoint: SIGKILL at step {self.step}, point {point!r}")
        os.kill(os.getpid(), signal.SIGKILL)

    def _log(self, m: StepMetrics, elapsed: float, done: int) -> None:
        if self.monitor is not None:
            self.monitor.record_step(m, rank=self.runtime.rank)
        last = self.step == self.total
        if self.runtime.is_main and (self.step % self.cfg.train.log_every == 0 or last):
            if self.metrics_log is not None:
                self.metrics_log.append(m)
            if self.progress:
                eta = elapsed / max(1, done) * (self.total - self.step)
                sp = f" sparsity {sum(m.sparsity) / len(m.sparsity):.3f}" if m.sparsity else ""
                self.say(f"step {self.step}/{self.total} loss {m.loss:.4f} query acc {m.query_acc:.3f}{sp} "
                         f"{m.tasks_per_s:.2f} tasks/s eta {eta / 60:.1f} min")
        if self.on_step is not None:
            self.on_step(m)

    def _checkpoint_and_hooks(self, m: StepMetrics) -> None:
        cfg = self.cfg
        final = self.step == self.total
        if self.sink is not None and (self.step % cfg.train.checkpoint_every == 0 or final):
            self.sink.save(self, self.step, m, final)
            if self.runtime.is_main:
                self._push()
        halt = cfg.debug.halt_at_step
        if halt is not None and self.step == halt and self.runtime.is_main and self.run_dir is not None:
            marker = self.run_dir / f".halted_at_step_{halt}"
            if not marker.exists():
                marker.write_text(str(self.step))
                self.say(f"debug.halt_at_step: halted after step {self.step}; waiting to be killed")
                while True:
                    time.sleep(3600)

    # ------------------------------------------------------------------------------ outputs
    def checkpoint_meta(self, step: int) -> ckpt.CheckpointMeta:
        return ckpt.CheckpointMeta(tag=ckpt.tag_of(step), step=step, tasks_per_step=self.cfg.train.tasks_per_step,
                                   world_size=self.runtime.world_size, zero_stage=self.cfg.dist.zero_stage,
                                   engine=self.engine_kind, theta_pre=self.model.space.fingerprint())

    def export(self) -> Path:
        """The fp32 model file of the run (``model.safetensors``), written atomically by rank 0."""
        import json

        path = self.run_dir / EXPORT_NAME
        export_model(self.model, path, self.cfg.train, extra={"run_config": json.dumps(to_dict(self.cfg))})
        return path

    def _push(self, *extra: str) -> None:
        """Rank 0: the run's metrics and log (and ``extra`` files) to its store, if it is object storage."""
        if self.store is not None:
            self.store.push(METRICS_FILE, runlog.RUN_LOG, *extra)

    def say(self, text: str) -> None:
        """A line for the console (rank 0 calls this) and the run's log file."""
        line = f"[smat-train] {text}"
        print(line, flush=True)
        runlog.append(self.run_dir, line)


TASK_MEANS = frozenset(k for k in TASK_KEYS if not k.startswith("time_")) | {"alpha_mean"}


def averaged_fields(m: StepMetrics) -> List[str]:
    """Fields averaged over ranks: every task mean (weighted by the rank's share of the step's tasks, see
    :data:`TASK_MEANS`, so that the result is the mean over all tasks), the time split and the
    per-expert vectors (identical anyway)."""
    keys = list(TASK_KEYS) + ["alpha_mean", "sparsity", "sparsity_test", "lagrange", "expected_density",
                              "temperature", "time_data", "time_student", "time_backward", "time_allreduce_step"]
    return [k for k in dict.fromkeys(keys) if getattr(m, k) is not None]


__all__ = ["MetaTrainRecipe", "meta_step", "state_fingerprint", "open_episodes", "EXPORT_NAME", "NonFiniteLoss",
           "InjectedFault", "CheckpointSink", "EpisodeProvider"]
