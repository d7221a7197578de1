"""The single-process and torchrun launchers, and the single-process trainer as a Python API.

``python -m smat_dist.train --config X.yaml [key=value ...]`` runs the recipe in this process (plain
torch, :class:`~smat_dist.train.engine.LocalEngine`). Started by torchrun (``torchrun
--nproc-per-node N -m smat_dist.train ...``) every rank joins torchrun's process group (gloo on CPU,
``cpu:gloo,cuda:nccl`` on GPU), wraps the model in DeepSpeed and builds its own episodes in-process
from the same deterministic stream. Both write checkpoints as ``<run_dir>/checkpoint_step_<step>/``:
every rank writes its part into a ``.partial`` directory, rank 0 adds the sidecar and renames it.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from smat_dist.config import RunConfig, to_yaml
from smat_dist.episode import Episode
from smat_dist.fsutil import publish
from smat_dist.record import StepMetrics
from smat_dist.runstore import RunStore
from smat_dist.smat import SMAT
from smat_dist.train import checkpoint as ckpt
from smat_dist.train import distributed
from smat_dist.train.config import TrainConfig
from smat_dist.train.distributed import Runtime
from smat_dist.train.recipe import EpisodeProvider, MetaTrainRecipe, rank_monitor


class LocalCheckpoints:
    """Checkpoints written by the ranks themselves into the run directory (shared storage for
    multi-node torchrun), or into each node's staging directory and uploaded when the run is stored in
    object storage (every node its own ranks' files, then rank 0 the sidecar that completes it)."""

    def save(self, recipe: MetaTrainRecipe, step: int, metrics: StepMetrics, final: bool) -> None:
        main = recipe.runtime.is_main
        store = recipe.store
        final_dir = ckpt.local_dir(recipe.run_dir, step)
        partial = final_dir.with_name(final_dir.name + ckpt.PARTIAL_SUFFIX)
        if main:
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crash at this step
            partial.mkdir(parents=True)
        distributed.barrier()
        meta = recipe.checkpoint_meta(step)
        recipe.engine.save(partial, meta.tag)
        distributed.barrier()  # every rank's files are in place
        recipe.debug_kill("files")
        remote = store is not None and store.remote
        if remote and recipe.runtime.local_rank == 0:  # one uploader per node
            store.upload_checkpoint(partial, sidecar=False)
            if not main:
                shutil.rmtree(partial, ignore_errors=True)
        if remote:
            distributed.barrier()  # every node's files are in the bucket
        if main:
            meta.write(partial)
            recipe.debug_kill("sidecar")
            if remote:
                store.upload_checkpoint(partial, sidecar=True)
                store.prune(recipe.cfg.train.keep_checkpoints)
            publish(partial, final_dir)
            recipe.debug_kill("committed")
            ckpt.prune(recipe.run_dir, recipe.cfg.train.keep_checkpoints)
        distributed.barrier()


def agreed_resume_point(store: RunStore, resume_from: Optional[str], local_rank: int = 0) -> Optional[Path]:
    """Rank 0 decides where the run continues from; every rank gets the same answer, as a local
    directory (one process per node downloads a checkpoint held in object storage)."""
    point = store.resume_point(resume_from) if distributed.rank() == 0 else None
    text = distributed.broadcast_string(point or "", max_len=4096)
    if not text:
        return None
    if local_rank == 0:
        local = store.fetch(text)
    distributed.barrier()
    return local if local_rank == 0 else store.fetch_target(text)


def run(cfg: RunConfig, runtime: Runtime) -> Path:
    """Train (or resume) on this rank; returns the run directory. Rank 0 writes the export at the end."""
    store = cfg.run_store()
    if runtime.is_main:
        store.write_text("run_config.yaml", to_yaml(cfg))
    distributed.barrier()
    monitor = rank_monitor(cfg, runtime.rank, default_backend="prometheus")
    recipe = MetaTrainRecipe(cfg, runtime, None, sink=LocalCheckpoints(), monitor=monitor, store=store)
    recipe.run(nullcontext(agreed_resume_point(store, cfg.dist.resume_from, runtime.local_rank)))
    return store.local


class Trainer:
    """The single-process launcher as a Python API, for tests, tools and notebooks::

        trainer = Trainer(SMAT(cfg.model), cfg.train, run_dir="runs/x")
        trainer.fit(ToyEpisodes(), steps=10, on_step=print)
        trainer.train_step(list_of_episodes)          # one meta-step over exactly these episodes

    Same recipe, same engine and checkpoint layout as ``python -m smat_dist.train``.
    """

    def __init__(self, model: SMAT, cfg: Union[TrainConfig, RunConfig], run_dir: Optional[str | Path] = None):
        run = cfg if isinstance(cfg, RunConfig) else RunConfig(train=cfg)
        run.model = model.cfg
        self.recipe = MetaTrainRecipe(run, Runtime("local", device=model.device), run_dir, model=model,
                                      sink=LocalCheckpoints() if run_dir is not None else None, progress=False)
        self.recipe.setup()

    @property
    def model(self) -> SMAT:
        return self.recipe.model

    @property
    def step(self) -> int:
        return self.recipe.step

    def train_step(self, episodes: Iterable[Episode]) -> StepMetrics:
        """One optimiser step over exactly ``episodes`` (their ``index`` is the global task index)."""
        return self.recipe.step_on(episodes)

    def fit(self, provider: EpisodeProvider, steps: Optional[int] = None,
            on_step: Optional[Callable[[StepMetrics], None]] = None) -> None:
        """Meta-steps until ``steps`` (default: the config's total), checkpointing when a run_dir is set."""
        self.recipe.use_episodes(provider)
        self.recipe.on_step = on_step
        self.recipe.train(steps)

    def load(self, directory: str | Path) -> None:
        self.recipe.resume(Path(directory))

    def export(self) -> Path:
        return self.recipe.export()


__all__ = ["run", "Trainer", "LocalCheckpoints", "agreed_resume_point"]
