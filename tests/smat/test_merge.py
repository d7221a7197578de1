"""The merge node against a plain-autograd implementation of θ = θ_pre + Σ_m α_m z_m ⊙ θδ(_m)."""

import numpy as np
import pytest
import torch

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.gates import GateLayout, GateSample, HardConcreteGates
from smat_dist.smat.merge import MergePlan, merge

SLOTS = [ParamSlot("w", torch.Size([4, 5]), 0, 20), ParamSlot("b", torch.Size([4]), 20, 4)]
N, M = 24, 3


@pytest.fixture(autouse=True, params=[1 << 18, 7], ids=["one-chunk", "many-chunks"])
def chunk_size(request, monkeypatch):
    monkeypatch.setattr("smat_dist.smat.gates.CHUNK_ELEMENTS", request.param)
    return request.param


def _reference(pre, delta, phi, u, alphas, structured, layout):
    """Autograd through the gates: z from φ and fixed noise u; one θ_t per task."""
    z = (torch.sigmoid((phi + u.log() - (1 - u).log()) / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
    zn = layout.expand(z)
    thetas = []
    for a in alphas:
        if delta.shape[0] == 1:
            thetas.append(pre + (a @ zn) * delta[0])
        else:
            thetas.append(pre + (a[:, None] * zn * delta).sum(0))
    return thetas


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("interpolated", [True, False])
@pytest.mark.parametrize("defer", [True, False])
def test_merge_gradients_match_autograd(structured, interpolated, defer):
    torch.manual_seed(0)
    layout = GateLayout(SLOTS, structured)
    gates = HardConcreteGates(layout, GateConfig(num_experts=M))
    pre = torch.randn(N)
    delta = torch.randn(1 if interpolated else M, N, requires_grad=True)
    alphas = [torch.softmax(torch.randn(M), 0).requires_grad_(True) for _ in range(3)]
    weights = [torch.randn(N) for _ in alphas]  # task t's loss = <w_t, θ_t>

    density_w = torch.tensor([0.5, -2.0, 1.5])  # a loss term on the expected density, folded into ∇φ
    sample = gates.sample(5)
    z0 = sample.z.clone()  # the flush reuses the draw's memory for ∇φ
    shared = MergePlan(layout, sample, gates, defer=True, capacity=2)  # one plan for the step's tasks
    for t, (a, w) in enumerate(zip(alphas, weights)):
        # without deferral every task flushes (and consumes) its own draw: give each a copy
        plan = shared if defer else MergePlan(layout, GateSample(z0.clone(), stochastic=True), gates, defer=False)
        last = t == len(alphas) - 1
        if last:
            theta, density = merge(pre, delta, gates.logits, a, plan, flush=True, with_density=True)
            ((theta * w).sum() + (density * density_w).sum()).backward()
        else:
            theta = merge(pre, delta, gates.logits, a, plan, flush=not defer)
            (theta * w).sum().backward()

    u = torch.from_numpy(np.random.Generator(np.random.PCG64(5)).random(gates.logits.shape[::-1], dtype=np.float32)).t()
    u = u * (1 - 2e-6) + 1e-6
    phi = gates.logits.detach().clone().requires_grad_(True)
    d2 = delta.detach().clone().requires_grad_(True)
    a2 = [a.detach().clone().requires_grad_(True) for a in alphas]
    ref = _reference(pre, d2, phi, u, a2, structured, layout)
    q = torch.sigmoid(gates.l0_shift - phi).clamp(1e-6, 1 - 1e-6)
    sizes = layout.group_sizes if structured else torch.ones(phi.shape[1])
    ref_density = ((1 - q) * sizes).sum(1) / N
    (sum((th * w).sum() for th, w in zip(ref, weights)) + (ref_density * density_w).sum()).backward()
    torch.testing.assert_close(density.detach(), ref_density.detach())

    for th_ref, a in zip(ref, alphas):  # forward values
        with torch.no_grad():
            th = merge(pre, delta, None, a, MergePlan(layout, GateSample(z0, stochastic=False)), True)
        torch.testing.assert_close(th, th_ref.detach())
    torch.testing.assert_close(delta.grad, d2.grad)
    torch.testing.assert_close(gates.logits.grad, phi.grad)
    for a, ar in zip(alphas, a2):
        torch.testing.assert_close(a.grad, ar.grad)


def test_deferred_gate_gradient_arrives_only_with_the_last_task():
    layout = GateLayout(SLOTS, False)
    gates = HardConcreteGates(layout, GateConfig(num_experts=M))
    plan = MergePlan(layout, gates.sample(0), gates, defer=True)
    delta = torch.randn(1, N, requires_grad=True)
    a = torch.full((M,), 1 / M)
    merge(torch.zeros(N), delta, gates.logits, a, plan, flush=False).sum().backward()
    assert gates.logits.grad is None and plan.pending == 1
    merge(torch.zeros(N), delta, gates.logits, a, plan, flush=True).sum().backward()
    assert gates.logits.grad is not None and plan.pending == 0


def test_all_gates_zero_gives_theta_pre_exactly_and_ones_with_one_hot_alpha_gives_pre_plus_delta():
    layout = GateLayout(SLOTS, False)
    pre = torch.randn(N)
    delta = torch.randn(1, N)
    zeros = MergePlan(layout, GateSample(torch.zeros(M, N), stochastic=False))
    for a in (torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 0.0, 0.0])):
        assert torch.equal(merge(pre, delta, None, a, zeros, True), pre)
    ones = MergePlan(layout, GateSample(torch.ones(M, N), stochastic=False))
    for m in range(M):
        onehot = torch.nn.functional.one_hot(torch.tensor(m), M).float()
        assert torch.equal(merge(pre, delta, None, onehot, ones, True), pre + delta[0])
