"""The Ray launcher (``smat-train``): a Ray Train ``TorchTrainer`` whose workers run the recipe.

The driver joins ``$RAY_ADDRESS`` (``ray job submit``) or starts a local Ray (:mod:`smat_dist.ray_session`),
then starts ``dist.num_workers`` workers. Each worker is a rank of the recipe with a DeepSpeed engine;
checkpoints are written by every rank into a temporary directory and handed to
``ray.train.report``, which persists them as ``<run_dir>/checkpoint_<time>/`` (Ray Train's
``storage_path``: a shared directory or ``s3://``/``gs://``) and restores the latest after a worker
failure (``dist.max_failures``). Re-running with the same ``train.run_name`` resumes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from smat_dist.config import RunConfig, from_dict, to_dict, to_yaml
from smat_dist.runstore import RunStore
from smat_dist.train import distributed
from smat_dist.train.distributed import Runtime, backend_for
from smat_dist.train.launch import agreed_resume_point
from smat_dist.train.metrics import StepMetrics
from smat_dist.train.recipe import EXPORT_NAME, MetaTrainRecipe

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path  # the run directory, or for object storage this node's staging copy of it
    export: Path
    checkpoint: Optional[str]
    metrics: dict
    uri: str = ""  # where the run is stored: the run directory or its s3:// / gs:// URI


class RayCheckpoints:
    """Every rank saves its part into a temporary directory; ``ray.train.report`` gathers and persists them."""

    def save(self, recipe: MetaTrainRecipe, step: int, metrics: StepMetrics, final: bool) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix="smat-ckpt-"))
        try:
            meta = recipe.checkpoint_meta(step)
            recipe.engine.save(tmp, meta.tag)
            if recipe.runtime.is_main:
                meta.write(tmp)
            distributed.barrier()
            scalars = {k: v for k, v in metrics.row().items() if isinstance(v, (int, float))}
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every ``report`` with its whole metrics dict at INFO from a logger named after its
    source file (so its ``LoggingConfig`` level does not reach it), and a failing rank's traceback at
    ERROR; the first stays a warning-only logger, the second goes to the run's log file instead
    (:func:`train_loop`), and the driver prints one line."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)


def train_loop(config: Dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: one rank of the recipe."""
    import ray.train
    import ray.train.torch

    from smat_dist.monitoring.recorder import worker_monitor

    cfg: RunConfig = from_dict(RunConfig, config["run"])
    store = RunStore(config["storage"], cfg.train.run_name, cfg.dist.staging_dir)  # as the driver resolved it
    if not config.get("verbose"):
        quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.dist.use_gpu else torch.device("cpu")
    runtime = Runtime("ray", ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device)
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    monitor = worker_monitor(cfg, runtime.rank, default_backend="ray")
    recipe = MetaTrainRecipe(cfg, runtime, None, sink=RayCheckpoints(), monitor=monitor, store=store)
    own = ray.train.get_checkpoint()  # this run's latest (a restart after a failure, or a re-run)
    resume = own.as_directory() if own is not None else \
        nullcontext(agreed_resume_point(store, cfg.dist.resume_from, runtime.local_rank))
    recipe.run(resume)


def train(cfg: RunConfig, *, verbose: bool = False) -> RunResult:
    """Run (or resume) meta-training on Ray; returns where the run and its exported model are."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from smat_dist import ray_session

    store = cfg.run_store()
    store.write_text("run_config.yaml", to_yaml(cfg))
    started = ray_session.connect(num_cpus=cfg.dist.local_num_cpus, use_gpu=cfg.dist.use_gpu,
                                  object_store_mb=cfg.dist.object_store_mb)
    try:
        resources = {"CPU": cfg.dist.cpus_per_worker}
        if cfg.dist.use_gpu:
            resources["GPU"] = cfg.dist.gpus_per_worker
        backend = backend_for(torch.device("cuda" if cfg.dist.use_gpu else "cpu"))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"run": to_dict(cfg), "storage": store.storage, "verbose": verbose},
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                         resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.train.run_name,
                # Ray Train's own INFO lines (resource requests, every report with its metrics) only with
                # --verbose; our progress lines and Ray's warnings and errors always show.
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
                # a local directory or object storage (Ray Train writes s3:// / gs:// through pyarrow.fs)
                storage_path=store.storage,
                failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
        return RunResult(run_dir=store.local, export=store.local / EXPORT_NAME, checkpoint=ckpt_path,
                         metrics=dict(result.metrics or {}), uri=store.uri)
    finally:
        ray_session.shutdown(started)


__all__ = ["train", "train_loop", "RunResult", "RayCheckpoints"]
