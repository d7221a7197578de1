"""Typed settings of meta-training (``train:``), its launchers (``dist:``) and the test hooks (``debug:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from smat_dist.errors import ConfigError, require


@dataclass
class TrainConfig:
    """What one run is called, where it is written, how long it trains and how often it logs/checkpoints."""

    run_name: str = "smat"
    output_dir: str = "runs"
    seed: int = 0
    tasks_per_step: int = 4  # global meta-batch: tasks whose gradients make one optimiser step
    tasks_per_epoch: int = 2000  # the reference's epoch (drives the LR schedule)
    epochs: int = 25  # ViT-S reference: 25 x 2000 = 50k tasks
    max_steps: Optional[int] = None  # overrides epochs when set
    checkpoint_every: int = 500  # optimiser steps
    keep_checkpoints: int = 2
    log_every: int = 1
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default
    stop_on_nonfinite: bool = True  # the reference stops training on a non-finite loss

    def validate(self) -> None:
        for name in ("tasks_per_step", "tasks_per_epoch", "checkpoint_every", "log_every"):
            require(getattr(self, name) >= 1, f"train.{name}", ">= 1", getattr(self, name))
        require(self.epochs >= 0, "train.epochs", ">= 0", self.epochs)
        require(self.max_steps is None or self.max_steps >= 0, "train.max_steps", ">= 0 or null", self.max_steps)
        require(self.keep_checkpoints >= 0, "train.keep_checkpoints", ">= 0 (0 keeps all)", self.keep_checkpoints)
        require(self.threads is None or self.threads >= 1, "train.threads", ">= 1 or null", self.threads)

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        return (self.epochs * self.tasks_per_epoch) // self.tasks_per_step


COMMUNICATION_TYPES = ("fp32", "bf16", "fp16")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed's communication settings (``dist.deepspeed``), passed to every rank's engine.

    The ZeRO stage itself is ``dist.zero_stage`` (checkpoints record it). Bucket sizes are in elements.
    """

    # Data type of the gradient all-reduce / reduce-scatter; None = the gradients' own (fp32). bf16 halves
    # the bytes on the wire at ~3 significant digits per reduced value.
    communication_data_type: Optional[str] = None
    overlap_comm: bool = False  # ZeRO 1/2: reduce buckets while the backward still runs
    reduce_bucket_size: int = 500_000_000  # elements per reduction bucket
    allgather_bucket_size: int = 500_000_000  # ZeRO 1/2: elements per all-gather of updated partitions
    contiguous_gradients: bool = True  # ZeRO 2: copy reduced gradients into one buffer (less fragmentation)
    reduce_scatter: bool = True  # ZeRO 1/2: reduce-scatter instead of all-reduce of the gradients

    def zero_settings(self) -> dict:
        """The ``zero_optimization`` entries besides ``stage``."""
        return dict(overlap_comm=self.overlap_comm, reduce_bucket_size=int(self.reduce_bucket_size),
                    allgather_bucket_size=int(self.allgather_bucket_size),
                    contiguous_gradients=self.contiguous_gradients, reduce_scatter=self.reduce_scatter)

    def validate(self) -> None:
        if self.communication_data_type is not None and self.communication_data_type not in COMMUNICATION_TYPES:
            raise ConfigError(f"dist.deepspeed.communication_data_type must be one of {list(COMMUNICATION_TYPES)} "
                              f"or null, got {self.communication_data_type!r}")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dist.deepspeed.{name} must be >= 1 (elements), got {getattr(self, name)}")


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
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # communication settings

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"dist.num_workers must be >= 1, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.max_failures < 0:
            raise ConfigError(f"dist.max_failures must be >= 0, got {self.max_failures}")
        self.deepspeed.validate()


def uneven_zero_error(tasks: int, ranks: int, stage: int) -> str:
    """Why ZeRO 1/2 need a meta-batch that the ranks share evenly (one message for both launchers)."""
    return (f"train.tasks_per_step={tasks} on {ranks} ranks is uneven, which dist.zero_stage={stage} cannot run: ZeRO 1/2 "
            f"reduce gradient buckets in the order a backward produces them, and a rank's padding micro-step "
            f"produces them in another order; use dist.zero_stage=0 or a multiple of {ranks} tasks")


KILL_POINTS = ("files", "sidecar", "committed")


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
    # Rank 0 kills its own process (SIGKILL, as the OOM killer or a lost node would) while it writes the
    # checkpoint of meta-step ``kill_in_checkpoint``, at ``kill_point``: "files" (every rank's engine files
    # are written, no sidecar yet), "sidecar" (single-process and torchrun: the sidecar is in the
    # .partial directory, not yet renamed) or "committed" (the checkpoint is whole, nothing after it ran).
    kill_in_checkpoint: Optional[int] = None
    kill_point: str = "files"

    def validate(self) -> None:
        if self.kill_point not in KILL_POINTS:
            raise ConfigError(f"debug.kill_point must be one of {', '.join(KILL_POINTS)}, got {self.kill_point!r}")
        for name in ("fault_at_step", "halt_at_step", "kill_in_checkpoint"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"debug.{name} must be >= 1 (a 1-based meta-step) or null, got {value}")
        if self.fault_rank < 0:
            raise ConfigError(f"debug.fault_rank must be >= 0, got {self.fault_rank}")


__all__ = ["TrainConfig", "DistConfig", "DeepSpeedConfig", "DebugConfig", "uneven_zero_error"]
