"""The meta-optimiser's update rules against torch's own, and its clipping."""

from __future__ import annotations

import torch

from smat_dist.smat.optim import SMATOptimizer


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(1000, generator=g)
    return p.clone().requires_grad_(True), p.clone().requires_grad_(True), g


def test_sgd_with_momentum_and_weight_decay_is_torch_sgd_bit_for_bit():
    ours, ref, g = _pair(0)
    opt = SMATOptimizer([dict(params=[ours], rule="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)])
    torch_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
    for _ in range(5):
        grad = torch.randn(1000, generator=g)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        assert torch.equal(ours, ref)


def test_clipping_scales_the_group_to_max_norm_and_reports_the_norm_before():
    ours, ref, g = _pair(1)
    grad = torch.randn(1000, generator=g) * 3.0
    ours.grad, ref.grad = grad.clone(), grad.clone()
    opt = SMATOptimizer([dict(params=[ours], rule="sgd", lr=1.0, max_norm=5.0, name="masks")])
    opt.step()
    expected_norm = torch.nn.utils.clip_grad_norm_([ref], 5.0)
    assert abs(opt.last_grad_norms["masks"] - float(expected_norm)) < 1e-4 * float(expected_norm)
    assert float(expected_norm) > 5.0  # the clip was active
    torch.testing.assert_close(ours, (ref - ref.grad).detach(), rtol=1e-6, atol=1e-6)


def test_an_inactive_clip_leaves_the_gradient_untouched(monkeypatch):
    """Below max_norm the clip is skipped, not multiplied by 1: same update, no pass over the gradient."""
    ours, ref, g = _pair(1)
    grad = torch.randn(1000, generator=g) * 1e-3
    ours.grad, ref.grad = grad.clone(), grad.clone()
    calls = []
    real = torch.Tensor.mul_
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, *a, **k: calls.append(self.shape) or real(self, *a, **k))
    opt = SMATOptimizer([dict(params=[ours], rule="sgd", lr=1.0, max_norm=5.0, name="masks")])
    opt.step()
    monkeypatch.undo()
    assert calls == []
    assert torch.equal(ours.detach(), (ref - grad).detach())
