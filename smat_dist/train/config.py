"""Typed settings of the training launchers (``dist:``) and of the test hooks (``debug:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from smat_dist.errors import ConfigError


@dataclass
class DistConfig:
    """How the ranks are placed. ``num_workers`` and the resource keys size the Ray launcher; under
    ``torchrun`` the world size is torchrun's (``--nnodes`` x ``--nproc-per-node``)."""

    num_workers: int = 2  # Ray Train workers = DeepSpeed data-parallel ranks
    use_gpu: bool = False  # one CUDA device per rank (Ray: gpus_per_worker; torchrun: cuda:LOCAL_RANK)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # Ray only, with use_gpu
    zero_stage: int = 0  # 0-2; the meta-gradients are all-reduced (0) or reduce-scattered (1, 2)
    max_failures: int = 0  # Ray only: worker-group restarts from the last checkpoint before the run fails
    # Resume explicitly from a checkpoint directory (any launcher's). Without it, re-running with the
    # same train.run_name resumes from that run's latest checkpoint.
    resume_from: Optional[str] = None
    # Where run directories live; None = train.output_dir. A local path (multi-node runs: one every
    # node sees, e.g. NFS or a PVC) or object storage (s3://bucket/runs, gs://...), see smat_dist/runstore.py.
    storage_path: Optional[str] = None
    # Node-local directory where ranks write a run stored in object storage before rank 0 uploads it;
    # None = $TMPDIR/smat-staging.
    staging_dir: Optional[str] = None
    local_num_cpus: Optional[int] = None  # local Ray (no RAY_ADDRESS): CPUs to offer; None = all
    object_store_mb: int = 256  # local Ray object store

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"dist.num_workers must be >= 1, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.max_failures < 0:
            raise ConfigError(f"dist.max_failures must be >= 0, got {self.max_failures}")


@dataclass
class DebugConfig:
    """Test hooks: crash or stop a run at a chosen meta-step to prove resume. Not for production runs;
    each fires once per run directory (a marker file there remembers it)."""

    # Rank ``fault_rank`` raises after computing meta-step ``fault_at_step`` (1-based), before it is logged.
    fault_at_step: Optional[int] = None
    fault_rank: int = 0
    # After meta-step ``halt_at_step`` is logged and checkpointed, rank 0 writes
    # ``<run_dir>/.halted_at_step_N`` and blocks, so a test can kill the run at a known point.
    halt_at_step: Optional[int] = None

    def validate(self) -> None:
        for name in ("fault_at_step", "halt_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"debug.{name} must be >= 1 (a 1-based meta-step) or null, got {value}")
        if self.fault_rank < 0:
            raise ConfigError(f"debug.fault_rank must be >= 0, got {self.fault_rank}")


__all__ = ["DistConfig", "DebugConfig"]
