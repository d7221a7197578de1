"""The Ray launcher (``smat-train``): a Ray Train ``TorchTrainer`` whose workers run the recipe.

The driver joins ``$RAY_ADDRESS`` (``ray job submit``) or starts a local Ray (:mod:`smat_dist.ray_session`),
then starts ``dist.num_workers`` workers. Each worker is a rank of the recipe with a DeepSpeed engine;
checkpoints are uploaded by every rank into ``<run_dir>/checkpoint_step_<step>/`` through Ray Train's
storage (its ``storage_path``: a shared directory or ``s3://``/``gs://``), committed by rank 0 and then
reported to Ray Train (:class:`RayCheckpoints`). After a worker failure (``dist.max_failures``) the
restarted group, and a re-run with the same ``train.run_name``, resume from the latest whole checkpoint.
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

from smat_dist import ray_session
from smat_dist.config import RunConfig, from_dict, to_dict, to_yaml
from smat_dist.record import StepMetrics
from smat_dist.runstore import RunStore
from smat_dist.train import checkpoint as ckpt
from smat_dist.train import distributed
from smat_dist.train.distributed import Runtime, backend_for
from smat_dist.train.launch import agreed_resume_point
from smat_dist.train.recipe import EXPORT_NAME, MetaTrainRecipe, rank_monitor

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path  # the run directory, or for object storage this node's staging copy of it
    export: Path
    checkpoint: Optional[str]
    metrics: dict
    uri: str = ""  # where the run is stored: the run directory or its s3:// / gs:// URI


class RayCheckpoints:
    """Every rank saves its part into a temporary directory and uploads it into
    ``<run_dir>/checkpoint_step_<step>/`` through Ray Train's storage filesystem; once every upload is
    done, rank 0 commits the checkpoint by writing its sidecar there
    (:func:`smat_dist.train.checkpoint.commit`), and only then is it reported to Ray Train (without a
    second upload). A crash before the commit leaves an unfinished directory that every reader skips and
    Ray never heard of, so Ray's record of the run (which it checks on a re-run, and prunes by
    ``train.keep_checkpoints``) only ever names whole checkpoints, each once."""

    def save(self, recipe: MetaTrainRecipe, step: int, metrics: StepMetrics, final: bool) -> None:
        import pyarrow.fs
        import ray.train
        from ray.train import CheckpointUploadMode

        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        dest = f"{storage.experiment_fs_path}/{ckpt.dir_name(step)}"
        meta = recipe.checkpoint_meta(step)
        tmp = Path(tempfile.mkdtemp(prefix="smat-ckpt-"))
        try:
            recipe.engine.save(tmp, meta.tag)
            fs.create_dir(dest)
            pyarrow.fs.copy_files(str(tmp), dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()  # every rank's files are in the run's storage
        recipe.debug_kill("files")
        if recipe.runtime.is_main:
            ckpt.commit(meta, fs, dest)
            recipe.debug_kill("committed")
        distributed.barrier()
        scalars = {k: v for k, v in metrics.row().items() if isinstance(v, (int, float))}
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint(dest, filesystem=fs),
                         checkpoint_dir_name=ckpt.dir_name(step), checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        if recipe.runtime.is_main and type(fs).__name__ == "LocalFileSystem":
            ckpt.prune(recipe.run_dir, 0)  # debris of crashed writes of earlier steps (Ray prunes whole ones)


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

    cfg: RunConfig = from_dict(RunConfig, config["run"])
    store = RunStore(config["storage"], cfg.train.run_name, cfg.dist.staging_dir)  # as the driver resolved it
    if not config.get("verbose"):
        quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.dist.use_gpu else torch.device("cpu")
    runtime = Runtime("ray", ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device)
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    monitor = rank_monitor(cfg, runtime.rank, default_backend="ray")
    recipe = MetaTrainRecipe(cfg, runtime, None, sink=RayCheckpoints(), monitor=monitor, store=store)
    # The run's latest whole checkpoint by the one definition every launcher and preflight use, not
    # ray.train.get_checkpoint(): Ray's record of reported checkpoints can lag the run directory by one
    # (a kill after the commit, before its snapshot file was written) and lists unfinished ones.
    recipe.run(nullcontext(agreed_resume_point(store, cfg.dist.resume_from, runtime.local_rank)))


def train(cfg: RunConfig, *, verbose: bool = False) -> RunResult:
    """Run (or resume) meta-training on Ray; returns where the run and its exported model are."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
