"""Driver side of ``smat-train``: connect to Ray, run a ``TorchTrainer``, collect the export.

With ``RAY_ADDRESS`` set (what ``ray job submit`` gives the entrypoint) the driver joins that
cluster; otherwise it starts a local Ray sized to the machine. Re-running with the same
``train.run_name`` (and storage) resumes from that run's latest checkpoint: Ray Train V2 restores
a run by ``(storage_path, name)``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import smat_dist
from smat_dist.config import RunConfig, to_dict, to_yaml
from smat_dist.dist.worker import EXPORT_NAME, train_loop

log = logging.getLogger(__name__)

# Environment for the Ray processes of a local cluster (controller and workers).
_LOCAL_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # faster failure detection on small boxes
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),  # see smat_dist/__init__.py
}


@dataclass
class RunResult:
    run_dir: Path
    export: Path
    checkpoint: Optional[str]
    metrics: dict


def run_dir_of(cfg: RunConfig) -> Path:
    storage = cfg.dist.storage_path or cfg.train.output_dir
    return Path(storage).expanduser().resolve() / cfg.train.run_name


def connect(cfg: RunConfig) -> bool:
    """Join RAY_ADDRESS or start a local Ray; returns True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    env = dict(_LOCAL_ENV)
    if not cfg.dist.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Workers must import this package; harmless when it is installed, needed when it is not.
    pkg_parent = str(Path(smat_dist.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # The cluster's (or the job's) runtime env applies; add only what workers need.
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {k: v for k, v in env.items() if k != "PYTHONPATH"}})
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every address on 127.0.0.1
    ray.init(
        num_cpus=cfg.dist.local_num_cpus or os.cpu_count(),
        num_gpus=None if cfg.dist.use_gpu else 0,
        include_dashboard=False,
        object_store_memory=cfg.dist.object_store_mb * 1024 * 1024,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return True


def train(cfg: RunConfig) -> RunResult:
    """Run (or resume) meta-training; returns where the run and its exported model are."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.yaml").write_text(to_yaml(cfg))
    started = connect(cfg)
    try:
        resources = {"CPU": cfg.dist.cpus_per_worker}
        if cfg.dist.use_gpu:
            resources["GPU"] = cfg.dist.gpus_per_worker
        resume = str(Path(cfg.dist.resume_from).expanduser().resolve()) if cfg.dist.resume_from else None
        if resume is not None and not Path(resume).is_dir():
            raise FileNotFoundError(f"dist.resume_from: no checkpoint directory {resume}")
        trainer = TorchTrainer(
            train_loop,
            # Ray Train V2 restores its own latest checkpoint by (storage, name); an explicit start
            # point goes to the workers, which use it only when the run has none of its own.
            train_loop_config={"run": to_dict(cfg), "run_dir": str(run_dir), "resume_from": resume},
            scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                         resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.train.run_name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        export = run_dir / EXPORT_NAME
        ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
        if not export.exists() and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                if (Path(d) / EXPORT_NAME).exists():
                    shutil.copy2(Path(d) / EXPORT_NAME, export)
        return RunResult(run_dir=run_dir, export=export, checkpoint=ckpt_path, metrics=dict(result.metrics or {}))
    finally:
        if started:
            ray.shutdown()
