"""Where a rank runs and how ranks talk: the one place that picks device, process-group backend and
makes collectives.

Every launcher describes its process with a :class:`Runtime` (rank, world size, device, backend);
the recipe never asks Ray or torchrun directly. All collectives of the training code go through the
functions below, which check that the tensor's device is one the process group serves: NCCL serves
CUDA tensors only, gloo CPU tensors only, so on GPUs we use the per-device backend
``cpu:gloo,cuda:nccl`` (DeepSpeed's gradient reductions run on CUDA over NCCL, our small bookkeeping
tensors stay on the CPU over gloo).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import FrozenSet, Iterator, List

import torch
import torch.distributed as tdist

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    launcher: str  # "local" (one process), "torchrun" or "ray"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks computing on ``device``."""
    return GPU_BACKEND if device.type == "cuda" else CPU_BACKEND


def served_devices(backend: str) -> FrozenSet[str]:
    """Device types a backend string serves: "gloo" -> cpu, "nccl" -> cuda, "cpu:gloo,cuda:nccl" -> both."""
    out = set()
    for item in backend.split(","):
        dev, _, name = item.rpartition(":")
        if dev:
            out.add(dev)
        elif name == "nccl":
            out.add("cuda")
        elif name in ("gloo", "mpi"):
            out.add("cpu")
            if name == "mpi":
                out.add("cuda")
        else:
            out.add(name)
    return frozenset(out)


def rank_device(use_gpu: bool, local_rank: int, local_world_size: int = 1) -> torch.device:
    """cuda:LOCAL_RANK with ``use_gpu``; more ranks on a node than it has GPUs is an error (ranks sharing a
    GPU would run, slowly and out of memory, instead of failing here before any work)."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("dist.use_gpu=true but torch sees no CUDA device on this node")
    if local_world_size > torch.cuda.device_count():
        raise RuntimeError(f"{local_world_size} ranks on this node but torch sees {torch.cuda.device_count()} GPU(s): "
                           f"start at most {torch.cuda.device_count()} (torchrun --nproc-per-node) with "
                           f"dist.use_gpu=true")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_torchrun(use_gpu: bool, timeout_s: float = 1800.0) -> Runtime:
    """Join the process group torchrun describes in the environment (``env://`` rendezvous)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = rank_device(use_gpu, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not is_initialized():
        tdist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout_s))
    return Runtime("torchrun", rank, world, local_rank, device)


def shutdown() -> None:
    """Barrier, then destroy the group: without the barrier a rank can abort at interpreter exit."""
    if is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------------- collectives
def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def _served(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, after checking the process group serves its device (a clear error instead of
    NCCL's "No backend type associated with device type cpu")."""
    backend = str(tdist.get_backend())
    if t.device.type not in served_devices(backend):
        raise RuntimeError(f"collective on a {t.device.type} tensor, but the process group backend {backend!r} "
                           f"serves {sorted(served_devices(backend))}")
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        tdist.all_reduce(_served(t), op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(world_size())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(out, _served(t.contiguous()))
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
    tdist.broadcast(_served(buf), src)
    return bytes(buf[1 : 1 + int(buf[0])].tolist()).decode()


def check_same_everywhere(name: str, value: str) -> None:
    """Fail loudly if ranks disagree (e.g. different θ_pre weights on different nodes)."""
    ref = broadcast_string(value)
    mismatch = torch.tensor([0 if ref == value else 1])
    all_reduce_sum(mismatch)
    if int(mismatch):
        raise RuntimeError(f"{name} differs between ranks (rank {rank()}: {value}, rank 0: {ref})")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    t = torch.tensor([1 if flag else 0])
    return bool(int(all_reduce_sum(t)))


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. a download or a cache fill), then the others."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def mean_over_ranks(values: List[float]) -> List[float]:
    """Element-wise mean over ranks of a list of numbers, in one collective."""
    if not values or not is_initialized():
        return list(values)
    return all_reduce_mean(torch.tensor(values, dtype=torch.float64)).tolist()


__all__ = ["Runtime", "backend_for", "served_devices", "rank_device", "init_torchrun", "shutdown",
           "is_initialized", "rank", "world_size", "all_reduce_sum", "all_reduce_mean", "all_gather_rows",
           "broadcast_string", "check_same_everywhere", "any_rank", "barrier", "rank_zero_first", "mean_over_ranks"]
