"""Everything that touches DeepSpeed or ``torch.distributed`` lives here.

The SMAT module goes into ``deepspeed.initialize`` with the project's client optimiser; DeepSpeed
all-reduces (ZeRO 0) or reduce-scatters (ZeRO 1/2) the meta-gradients of θδ, the gate logits, the
hypernetwork and λ, and applies gradient accumulation over a worker's tasks. θ_pre is not part of
the module's state (see :class:`smat_dist.smat.SMAT`), so it is neither reduced nor checkpointed.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from smat_dist.dist.config import DistConfig

log = logging.getLogger(__name__)

# Classes DeepSpeed writes into ZeRO optimizer-state files; the only globals our checkpoint
# loader lets the weights-only unpickler rebuild (no arbitrary code from a checkpoint).
_SAFE_DS_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


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


def ds_config(cfg: DistConfig, tasks_per_worker: int) -> Dict[str, Any]:
    """DeepSpeed config: one task per micro-step, accumulation over a worker's tasks, fp32 master
    weights (mixed precision is autocast inside the model), clipping done per group by the
    client optimiser (so DeepSpeed's global-norm clipping is off)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(tasks_per_worker),
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: DistConfig, tasks_per_worker: int):
    deepspeed = import_deepspeed(cfg.use_gpu)
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(cfg, tasks_per_worker), dist_init_required=False
    )
    if cfg.zero_stage > 0 and hasattr(optimizer, "norm_reducer"):
        # ZeRO 1/2 hand each rank a partition of every group: per-group norms need a sum over ranks.
        optimizer.norm_reducer = all_reduce_sum
    _make_checkpoint_loading_safe(engine)
    return engine, ds_opt


def _resolve(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _make_checkpoint_loading_safe(engine) -> None:
    """DeepSpeed loads its own files with ``weights_only=False`` (full unpickling). Swap in a
    weights-only load that allows just the few DeepSpeed classes its optimizer states contain."""
    ce = engine.checkpoint_engine
    allowed = [g for g in (_resolve(p) for p in _SAFE_DS_GLOBALS) if g is not None]

    def safe_load(path, map_location=None, *args, **kwargs):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = safe_load


def save_checkpoint(engine, directory: str, tag: str, client_state: Dict[str, Any]) -> None:
    """Every rank writes its part (ZeRO partitions); rank 0 also the module state."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state)


def load_checkpoint(engine, directory: str, tag: Optional[str] = None) -> Dict[str, Any]:
    path, client_state = engine.load_checkpoint(
        directory, tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory} (tag={tag})")
    return client_state or {}


def latest_tag(directory: str) -> Optional[str]:
    latest = os.path.join(directory, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return f.read().strip()
    return None


# ---------------------------------------------------------------------- process group helpers
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(world_size())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_string(text: str, src: int = 0, max_len: int = 256) -> str:
    """A short string from ``src`` to every rank, as bytes in a tensor (no pickling)."""
    if not is_initialized():
        return text
    buf = torch.zeros(max_len + 1, dtype=torch.uint8)
    if rank() == src:
        data = text.encode()[:max_len]
        buf[0] = len(data)
        buf[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return bytes(buf[1 : 1 + int(buf[0])].tolist()).decode()


def check_same_everywhere(name: str, value: str) -> None:
    """Fail loudly if ranks disagree (e.g. different θ_pre weights on different nodes)."""
    ref = broadcast_string(value)
    mismatch = torch.tensor([0 if ref == value else 1])
    all_reduce_sum(mismatch)
    if int(mismatch):
        raise RuntimeError(f"{name} differs between ranks (rank {rank()}: {value}, rank 0: {ref})")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextmanager
def rank_zero_first():
    """Rank 0 runs the body first (e.g. a download or a cache fill), then the others."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def pack(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def mean_over_ranks(metrics: Dict[str, Any], keys: List[str]) -> Dict[str, Any]:
    """Average the listed scalar/vector metrics over ranks in one collective."""
    flat, shapes = [], []
    for k in keys:
        v = torch.as_tensor(metrics[k], dtype=torch.float64).reshape(-1)
        flat.append(v)
        shapes.append(v.numel())
    if not flat:
        return metrics
    buf = all_reduce_mean(torch.cat(flat))
    out = dict(metrics)
    i = 0
    for k, n in zip(keys, shapes):
        chunk = buf[i : i + n]
        out[k] = float(chunk[0]) if n == 1 and not isinstance(metrics[k], list) else chunk.tolist()
        i += n
    return out
