"""Episodes on a device: the one CPU -> accelerator path (pinned memory, non-blocking), checked on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from smat_dist.episode import Episode, to_device


def _episode() -> Episode:
    return Episode(support_x=torch.randn(4, 3, 8, 8), support_y=torch.tensor([0, 1, 0, 1]),
                   query_x=torch.randn(2, 3, 8, 8), query_y=torch.tensor([1, 0]))


def test_tensors_already_on_the_device_are_kept():
    t = torch.ones(3)
    assert to_device(t, "cpu") is t
    gpu = SimpleNamespace(device=torch.device("cuda", 1))  # a tensor on GPU 1: a bare "cuda" accepts it
    assert to_device(gpu, "cuda") is gpu


def test_cpu_to_gpu_goes_through_pinned_memory_without_blocking(monkeypatch):
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append(("to", torch.device(device), non_blocking))
            return "on-gpu"

    def pin_memory(self):
        calls.append(("pin", tuple(self.shape)))
        return Pinned()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    assert to_device(torch.ones(2, 3), "cuda:0") == "on-gpu"
    assert calls == [("pin", (2, 3)), ("to", torch.device("cuda", 0), True)]


def test_an_episode_moves_every_tensor_and_keeps_its_identity():
    ep = _episode()
    moved = ep.to("meta")  # a non-CPU device without a GPU: plain copy, no pinning
    assert {t.device.type for t in (moved.support_x, moved.support_y, moved.query_x, moved.query_y)} == {"meta"}
    assert moved.support_x.shape == ep.support_x.shape and moved.query_y.dtype == torch.int64
    same = ep.to("cpu")
    assert same.support_x is ep.support_x and same.query_y is ep.query_y
