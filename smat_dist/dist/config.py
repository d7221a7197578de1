"""Typed settings of the distributed trainer (Ray Train workers, each a DeepSpeed engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from smat_dist.errors import ConfigError


@dataclass
class DistConfig:
    num_workers: int = 2  # Ray Train workers = DeepSpeed data-parallel ranks
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    zero_stage: int = 0  # 0-2; the meta-gradients are all-reduced (0) or reduce-scattered (1, 2)
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails
    # Resume explicitly from a checkpoint directory (a reported Ray checkpoint of a run). Without
    # it, re-running with the same train.run_name resumes from that run's latest checkpoint.
    resume_from: Optional[str] = None
    # Where Ray Train keeps checkpoints and the run directory; None = train.output_dir.
    # Multi-node runs need a path every node sees (NFS) or a cloud URI.
    storage_path: Optional[str] = None
    local_num_cpus: Optional[int] = None  # local Ray (no RAY_ADDRESS): CPUs to offer; None = all
    object_store_mb: int = 256  # local Ray object store
    # Test-only fault injection: rank `fault_rank` raises once when it reaches this meta-step.
    fault_at_step: Optional[int] = None
    fault_rank: int = 0
    # Test-only: the driver process kills itself (SIGKILL) after this many reported steps.
    kill_driver_after_step: Optional[int] = None
    # "shards": episodes from the data plane (data.*); "toy": in-memory synthetic episodes
    # (smat_dist.smat.toy), for tests and smoke runs that do not need a dataset.
    episodes: str = "shards"
    toy_image_size: int = 16

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"dist.num_workers must be >= 1, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.episodes not in ("shards", "toy"):
            raise ConfigError(f"dist.episodes must be shards or toy, got {self.episodes!r}")
