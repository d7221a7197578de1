"""CPU ranks keep freed memory for reuse (glibc mallopt), once per process, only when configured."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from smat_dist.smat import SMAT
from smat_dist.train import allocator
from smat_dist.train.config import TrainConfig
from smat_dist.train.launch import Trainer

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


@glibc
def test_mallopt_is_applied_once_in_a_fresh_process():
    code = ("from smat_dist.train import allocator as a; import ctypes, ctypes.util; "
            "print(a._applied, a.keep_freed_memory(), a._applied, a.keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True", "True"]


@pytest.mark.parametrize("keep", [True, False])
def test_the_recipe_applies_it_on_cpu_only_when_configured(tiny_cfg, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("smat_dist.train.recipe.keep_freed_memory", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    Trainer(SMAT(tiny_cfg), TrainConfig(tasks_per_step=2, tasks_per_epoch=100, keep_freed_memory=keep))
    assert calls == ([1] if keep else [])


def test_refused_settings_leave_glibc_alone(monkeypatch):
    class FakeLibc:
        class mallopt:  # noqa: N801 - stands in for a ctypes function
            argtypes = restype = None

            def __new__(cls, key, value):
                return 0

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeLibc)
    assert allocator.keep_freed_memory() is False and allocator._applied is False
