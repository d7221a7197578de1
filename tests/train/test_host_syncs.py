"""No host synchronisation inside a meta-step's task loop: the values a step reads back to the host
(finiteness, α, task metrics, phase times) are gathered on the device and read once per step, so the
number of tensor-to-host reads of a meta-step does not grow with its number of tasks.

On CPU a read costs nothing, but each one here would be a stall of the kernel queue on a GPU: the
test counts them on CPU, at the dispatcher (``aten._local_scalar_dense``: ``.item()``, ``bool()``,
``float()``, ``int()``; copies off a device) and at the Python methods that read without it
(``tolist``, ``numpy``)."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smat_dist.train.config import TrainConfig
from smat_dist.smat import SMAT
from smat_dist.train.launch import Trainer


class HostReads(TorchDispatchMode):
    """Counts tensor-to-host reads while active, with where each came from (for the failure message)."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "smat_dist" in f.filename][-2:]
        self.where[what + " @ " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self._note("scalar")
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self._note("to host")
        return func(*args, **kwargs)

    def __enter__(self):
        self._patched = {}
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapped(t, *a, _name=name, _original=original, **k):
                self._note(_name)
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def test_the_counter_sees_each_kind_of_read():
    t = torch.arange(3.0)
    with HostReads() as reads:
        t.sum().item()
        bool(t.max() > 1)
        float(t[0])
        t.tolist()
        t.numpy()
    assert reads.count == 5, reads.where


def _reads_of_one_step(tiny_cfg, toy, tasks: int) -> HostReads:
    torch.manual_seed(0)
    trainer = Trainer(SMAT(tiny_cfg), TrainConfig(tasks_per_step=tasks, tasks_per_epoch=1000))
    trainer.train_step([toy.episode(i) for i in range(tasks)])  # warm-up: lazy state, optimiser buffers
    episodes = [toy.episode(100 + i) for i in range(tasks)]  # built before counting: the data plane's work
    with HostReads() as reads:
        m = trainer.train_step(episodes)
    assert len(m.tasks) == tasks and all(t.alpha is not None for t in m.tasks)
    return reads


@pytest.mark.parametrize("teacher", [True, False])
def test_host_reads_of_a_meta_step_do_not_grow_with_its_tasks(tiny_cfg, toy, teacher):
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, teacher=dataclasses.replace(tiny_cfg.teacher, enabled=teacher))
    two, five = _reads_of_one_step(cfg, toy, 2), _reads_of_one_step(cfg, toy, 5)
    grown = {k: five.where[k] - two.where.get(k, 0) for k in five.where if five.where[k] != two.where.get(k, 0)}
    assert five.count == two.count, f"reads that grow with the tasks of a step: {grown}"
    assert two.count > 0  # the step's one read of its metrics is there (the counter is live)


def test_a_non_finite_task_still_stops_the_step_before_the_optimiser(tiny_cfg, toy):
    """The finiteness check is read once per step, but still before any parameter changes."""
    from smat_dist.train.recipe import NonFiniteLoss

    torch.manual_seed(0)
    trainer = Trainer(SMAT(tiny_cfg), TrainConfig(tasks_per_step=3, tasks_per_epoch=1000))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    bad = toy.episode(1)
    bad.support_x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="task 1: loss is nan"):
        trainer.train_step([toy.episode(0), bad, toy.episode(2)])
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimiser step was taken


def test_test_gate_sparsity_is_measured_at_logged_steps_only(tiny_cfg, toy, monkeypatch):
    """The test-gate sparsity is a pass over all (M, G) gate logits: it runs on the steps whose
    metrics are written (every ``log_every``-th and the last), not on every step."""
    from smat_dist.smat.gates import HardConcreteGates

    calls = []
    real = HardConcreteGates.test_sparsity
    monkeypatch.setattr(HardConcreteGates, "test_sparsity", lambda self: calls.append(1) or real(self))
    torch.manual_seed(0)
    trainer = Trainer(SMAT(tiny_cfg), TrainConfig(tasks_per_step=2, tasks_per_epoch=1000, log_every=3, max_steps=7))
    seen = []
    trainer.fit(toy, steps=7, on_step=lambda m: seen.append((m.step, m.sparsity_test)))
    logged = [s for s, sp in seen if sp is not None]
    assert logged == [3, 6, 7] and len(calls) == 3
    assert all(sp is None for s, sp in seen if s not in logged)
    assert all(len(sp) == trainer.model.num_experts and 0.0 <= min(sp) for s, sp in seen if s in logged)
