"""How a rank turns task losses into an optimiser step, and saves/loads that state.

Two engines behind one interface, chosen by the launcher:

* :class:`DeepSpeedEngine` (Ray and torchrun ranks): the SMAT module goes into
  ``deepspeed.initialize`` with the project's client optimiser; DeepSpeed all-reduces (ZeRO 0) or
  reduce-scatters (ZeRO 1/2) the meta-gradients of θδ, gate logits, hypernetwork and λ, and
  accumulates over a rank's tasks. θ_pre is not part of the module's state (see
  :class:`smat_dist.smat.SMAT`), so it is neither reduced nor checkpointed.
* :class:`LocalEngine` (one process): plain torch, ``loss / B`` backward per task and one optimiser
  step per meta-step — no DeepSpeed, no process group, the same arithmetic.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from smat_dist.smat.optim import SMATOptimizer
from smat_dist.train import distributed
from smat_dist.train.config import DeepSpeedConfig

# Classes DeepSpeed writes into ZeRO optimizer-state files; the only globals our checkpoint
# loader lets the weights-only unpickler rebuild (no arbitrary code from a checkpoint).
_SAFE_DS_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

LOCAL_STATE = "state.pt"  # LocalEngine's file inside a checkpoint tag directory


class Engine:
    """Per-task ``backward``, per-meta-step ``finish_step``; ``save``/``load`` of this rank's state."""

    kind = "?"

    def __init__(self, model: torch.nn.Module, optimizer: SMATOptimizer):
        self.model = model
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one task's loss (no host synchronisation)."""
        raise NotImplementedError

    def complete_backward(self) -> None:
        """After the meta-step's last task: every gradient reduction done (the same collectives on every rank)."""

    def finish_step(self) -> None:
        """After :meth:`complete_backward`: the optimiser step."""

    def save(self, directory: Path, tag: str) -> None:
        raise NotImplementedError

    def load(self, directory: Path, tag: str) -> None:
        raise NotImplementedError


class LocalEngine(Engine):
    kind = "local"

    def __init__(self, model: torch.nn.Module, optimizer: SMATOptimizer, tasks_per_step: int):
        super().__init__(model, optimizer)
        self.tasks_per_step = int(tasks_per_step)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.tasks_per_step).backward()

    def finish_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path, tag: str) -> None:
        path = Path(directory) / tag / LOCAL_STATE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, path)

    def load(self, directory: Path, tag: str) -> None:
        path = Path(directory) / tag / LOCAL_STATE
        state = torch.load(str(path), map_location=self.model.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def import_deepspeed(use_gpu: bool):
    """Import DeepSpeed for this process's device, without its CPU shared-memory JIT op.

    On CPU every ``deepspeed.initialize`` would otherwise compile ``deepspeed_shm_comm`` (~17 s);
    gloo does the collectives fine without it. Set ``SMAT_DS_SHM=1`` to keep it.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    if os.environ.get("SMAT_DS_SHM") != "1":
        # `import deepspeed.comm.torch as m` would bind the torch package: patch the module object.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def micro_steps(tasks_per_step: int, world_size: int) -> int:
    """Micro-steps every rank runs per meta-step: ⌈B/W⌉ (DeepSpeed needs the same count on every rank)."""
    return -(-int(tasks_per_step) // int(world_size))


def ds_config(zero_stage: int, tasks_per_rank: int, settings: Optional[DeepSpeedConfig] = None) -> Dict[str, Any]:
    """One task per micro-step, accumulation over ``tasks_per_rank`` micro-steps, fp32 master weights
    (mixed precision is autocast inside the model), clipping per group in the client optimiser (so
    DeepSpeed's global-norm clipping is off); the communication settings from ``dist.deepspeed``."""
    settings = settings or DeepSpeedConfig()
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(tasks_per_rank),
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": int(zero_stage), **settings.zero_settings()},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if settings.communication_data_type is not None:
        config["communication_data_type"] = settings.communication_data_type
    return config


class DeepSpeedEngine(Engine):
    """DeepSpeed over ``world_size`` ranks for a meta-batch of ``tasks_per_step`` tasks, any split.

    Ranks own ⌈B/W⌉ or ⌊B/W⌋ tasks, but DeepSpeed reduces at a fixed micro-step count, so every rank
    runs ``n = ⌈B/W⌉`` micro-steps: a rank with fewer tasks adds one zero-loss backward. DeepSpeed
    divides each micro-step's loss by ``n`` and the reduced gradient by ``W``; scaling every task loss
    by ``W·n/B`` makes the step's gradient the mean over the B tasks, as on one rank.
    """

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: SMATOptimizer, *, zero_stage: int, tasks_per_step: int,
                 world_size: int, settings: Optional[DeepSpeedConfig] = None):
        super().__init__(model, optimizer)
        deepspeed = import_deepspeed(model.device.type == "cuda")
        self.micro_steps = micro_steps(tasks_per_step, world_size)
        self.loss_scale = world_size * self.micro_steps / tasks_per_step
        self.config = ds_config(zero_stage, self.micro_steps, settings)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False)
        if zero_stage > 0:
            # ZeRO 1/2 hand each rank a partition of every group: per-group norms need a sum over ranks.
            optimizer.norm_reducer = distributed.all_reduce_sum
        self._done = 0  # micro-steps of the current meta-step
        self._make_checkpoint_loading_safe()

    def backward(self, loss: torch.Tensor) -> None:
        if self._done:  # the previous micro-step's (non-boundary) step: DeepSpeed counts micro-steps there
            self.engine.step()
        scaled = loss if self.loss_scale == 1.0 else loss * self.loss_scale
        self.engine.backward(scaled)
        self._done += 1

    def complete_backward(self) -> None:
        """Pad to the common micro-step count: the last micro-step's backward reduces the gradients."""
        while self._done < self.micro_steps:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.backward(sum((p * 0.0).sum() for p in params))

    def finish_step(self) -> None:
        """The boundary step: DeepSpeed's optimiser step."""
        self.engine.step()
        self._done = 0

    def save(self, directory: Path, tag: str) -> None:
        """Every rank writes its part (ZeRO partitions); rank 0 also the module state."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={})

    def load(self, directory: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory} (tag={tag})")

    def _make_checkpoint_loading_safe(self) -> None:
        """DeepSpeed loads its own files with ``weights_only=False`` (full unpickling). Swap in a
        weights-only load that allows just the few DeepSpeed classes its optimizer states contain."""
        allowed = [g for g in (_resolve(p) for p in _SAFE_DS_GLOBALS) if g is not None]

        def safe_load(path, map_location=None, *args, **kwargs):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

        self.engine.checkpoint_engine.load = safe_load


def _resolve(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


__all__ = ["Engine", "LocalEngine", "DeepSpeedEngine", "import_deepspeed", "ds_config", "micro_steps", "LOCAL_STATE"]
