"""The one place for devices, process-group backends and collectives, checked on CPU for what a GPU run
does differently: the backend each launcher picks with use_gpu, and that no collective runs on a tensor the
group's backend does not serve (NCCL serves CUDA tensors only)."""

from __future__ import annotations

import ast
import socket

import pytest
import torch
import torch.distributed as tdist

from smat_dist.train import distributed
from smat_dist.train.distributed import GPU_BACKEND, Runtime, backend_for, served_devices

from .conftest import REPO, tiny_run_config

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier",
               "send", "recv", "isend", "irecv", "gather", "scatter", "init_process_group"}


def test_backends_and_the_devices_they_serve():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == GPU_BACKEND == "cpu:gloo,cuda:nccl"
    assert served_devices("gloo") == {"cpu"}
    assert served_devices("nccl") == {"cuda"}
    assert served_devices(GPU_BACKEND) == {"cpu", "cuda"}


def test_no_collective_outside_the_one_module():
    """Every torch.distributed call of the package goes through smat_dist/train/distributed.py, which checks
    devices; this fails when a module imports torch.distributed or calls a collective on it directly."""
    offenders = []
    for path in sorted((REPO / "smat_dist").rglob("*.py")):
        if path == REPO / "smat_dist" / "train" / "distributed.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                mod = getattr(node, "module", None) or ""
                if path == REPO / "smat_dist" / "loopback.py":
                    continue  # it binds the rendezvous store's socket to loopback and runs no collective
                if any(n.startswith("torch.distributed") for n in names) or mod.startswith("torch.distributed") \
                        or (mod == "torch" and "distributed" in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: imports torch.distributed")
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and \
                    ast.unparse(node.value) == "torch.distributed":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # what torchrun would set
        monkeypatch.setenv(key, value)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_a_collective_on_a_device_the_backend_does_not_serve_is_refused(gloo_world_of_one, monkeypatch):
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t).tolist() == [1.0, 1.0, 1.0]  # gloo serves the CPU
    with pytest.raises(RuntimeError, match="collective on a meta tensor"):
        distributed.all_reduce_sum(torch.ones(3, device="meta"))
    # An NCCL-only group (Ray Train's default on GPUs) refuses the CPU bookkeeping tensors outright.
    monkeypatch.setattr(tdist, "get_backend", lambda *a, **k: "nccl")
    with pytest.raises(RuntimeError, match="backend 'nccl' serves \\['cuda'\\]"):
        distributed.all_gather_rows(torch.zeros(1, 4))


def test_every_collective_of_a_meta_step_is_on_a_served_device(gloo_world_of_one, monkeypatch, tmp_path):
    """A DeepSpeed rank's whole run (ours and DeepSpeed's collectives), with every torch.distributed collective
    spied on: each tensor's device must be one the group's backend serves."""
    from smat_dist.train.launch import LocalCheckpoints
    from smat_dist.train.recipe import MetaTrainRecipe

    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            served = served_devices(str(tdist.get_backend()))
            for t in tensors:
                assert t.device.type in served, f"{name} on a {t.device.type} tensor under {tdist.get_backend()}"
            seen.append(name)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce"):
        if hasattr(tdist, name):
            monkeypatch.setattr(tdist, name, spy(name, getattr(tdist, name)))
    cfg = tiny_run_config(tmp_path, "spy", "train.tasks_per_step=2", "train.max_steps=2", "train.checkpoint_every=2")
    recipe = MetaTrainRecipe(cfg, Runtime("torchrun"), tmp_path / "spy", sink=LocalCheckpoints())
    recipe.setup()
    recipe.train()
    assert recipe.engine.kind == "deepspeed" and recipe.step == 2
    assert "broadcast" in seen and "all_reduce" in seen  # θ_pre check, gradients and metrics all went through


def test_launchers_pick_the_mixed_backend_with_gpus(monkeypatch, tmp_path):
    """use_gpu: Ray Train gets ``cpu:gloo,cuda:nccl`` (its default NCCL group fails on the first CPU tensor);
    a torchrun rank initialises the same and takes cuda:LOCAL_RANK."""
    import ray.train.torch

    from smat_dist import ray_session
    from smat_dist.train import ray_launcher

    captured = {}

    class FakeTrainer:
        def __init__(self, loop, **kwargs):
            captured.update(kwargs)

        def fit(self):
            raise RuntimeError("stop here")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray_session, "connect", lambda **kw: False)
    cfg = tiny_run_config(tmp_path, "gpu", "dist.use_gpu=true", "dist.num_workers=2")
    with pytest.raises(RuntimeError, match="stop here"):
        ray_launcher.train(cfg)
    assert captured["torch_config"].backend == "cpu:gloo,cuda:nccl"
    assert captured["scaling_config"].use_gpu and captured["scaling_config"].num_workers == 2

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: captured.setdefault("set_device", d))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: captured.setdefault("pg", backend))
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    rt = distributed.init_torchrun(use_gpu=True)
    assert captured["pg"] == "cpu:gloo,cuda:nccl"
    assert rt.device == torch.device("cuda", 1) == captured["set_device"] and (rt.rank, rt.world_size) == (1, 2)


def test_use_gpu_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="dist.use_gpu=true but torch sees no CUDA device"):
        distributed.rank_device(True, 0)


def test_more_ranks_than_gpus_is_one_clear_error_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("a device was taken"))
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: pytest.fail("the group was joined"))
    with pytest.raises(RuntimeError, match="2 ranks on this node but torch sees 1 GPU\\(s\\): start at most 1"):
        distributed.init_torchrun(use_gpu=True)


def test_state_fingerprint_needs_no_copy_of_the_parameters(tiny_cfg):
    """The per-step cross-rank check sums every trainable tensor chunk by chunk in fp64: the same numbers as a
    whole-tensor fp64 sum, without an fp64 copy of |θ|-sized tensors."""
    from smat_dist.smat import SMAT
    from smat_dist.train import recipe
    from smat_dist.record import StepMetrics

    model = SMAT(tiny_cfg)
    old = recipe.STATE_CHUNK
    try:
        recipe.STATE_CHUNK = 1000  # many chunks even for the tiny model
        state = recipe.state_fingerprint(model, StepMetrics(step=3))
    finally:
        recipe.STATE_CHUNK = old
    sums = torch.tensor([p.detach().double().sum() for p in model.parameters()])
    torch.testing.assert_close(state[2:], sums, rtol=1e-12, atol=1e-9)
    assert state[:2].tolist() == [3.0, 0.0]
