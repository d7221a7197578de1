import math

import numpy as np

import pytest
import torch

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.gates import GateLayout, HardConcreteGates

SLOTS = [
    ParamSlot("w", torch.Size([3, 4]), 0, 12),  # 2-D: 4 column groups of 3
    ParamSlot("b", torch.Size([3]), 12, 3),  # 1-D: element-wise
    ParamSlot("conv", torch.Size([2, 1, 2, 2]), 15, 8),  # conv: 2 output-channel groups of 4
]


@pytest.fixture(autouse=True, params=[1 << 18, 7], ids=["one-chunk", "many-chunks"])
def chunk_size(request, monkeypatch):
    """Every gate computation walks column chunks; the results must not depend on their size."""
    monkeypatch.setattr("smat_dist.smat.gates.CHUNK_ELEMENTS", request.param)
    return request.param


def _gates(structured=False, **kw):
    return HardConcreteGates(GateLayout(SLOTS, structured=structured), GateConfig(num_experts=3, **kw))


def test_expected_l0_equals_closed_form_and_its_gradient():
    for structured in (False, True):
        g = _gates(structured)
        with torch.no_grad():
            g.logits.copy_(torch.linspace(-6, 6, g.logits.numel()).view_as(g.logits))
        phi = g.logits.detach().clone().requires_grad_(True)
        beta, gamma, zeta, eps = 2 / 3, -0.1, 1.1, 1e-6
        q = torch.sigmoid(beta * math.log(-gamma / zeta) - phi).clamp(eps, 1 - eps)
        sizes = g.layout.group_sizes if structured else torch.ones(phi.shape[1])
        closed = ((1 - q) * sizes).sum(1) / 23
        e = g.expected_density()
        torch.testing.assert_close(e, closed)
        w = torch.tensor([0.3, -1.0, 2.0])
        (closed * w).sum().backward()
        (e * w).sum().backward()
        torch.testing.assert_close(g.logits.grad, phi.grad)
    # the constant in Q(0; phi) = sigmoid(-1.5986 - phi) of the reference
    assert g.l0_shift == pytest.approx(-1.59860, abs=1e-4)


def test_deterministic_gates_are_exactly_zero_or_in_unit_interval():
    g = _gates()
    with torch.no_grad():
        g.logits.copy_(torch.linspace(-5, 5, g.logits.numel()).view_as(g.logits))
    z = g.deterministic()
    phi = g.logits.detach()
    threshold = math.log(0.1 / 1.1)  # sigmoid(phi)*1.2 - 0.1 = 0  <=>  phi = logit(1/12) = -2.3979
    assert torch.equal(z == 0, phi <= threshold)
    nz = z[z != 0]
    assert bool(((nz > 0) & (nz <= 1)).all())
    assert torch.equal(z == 1, phi >= -threshold)
    torch.testing.assert_close(z, (torch.sigmoid(phi) * 1.2 - 0.1).clamp(0, 1))


def test_training_gates_follow_the_hard_concrete_formula_and_derivative():
    for noise in ("hard_concrete", "reference"):
        g = _gates(noise=noise)
        sample = g.sample(3)
        # the noise of (expert m, group j) is element j*M + m of seed 3's PCG64 stream
        u = torch.from_numpy(np.random.Generator(np.random.PCG64(3)).random((23, 3), dtype=np.float32)).t()
        lo, hi = (1e-6, 1 - 1e-6) if noise == "hard_concrete" else (0.5 - 1e-6, 0.5 + 1e-6)
        u = u * (hi - lo) + lo
        phi = g.logits.detach().clone().requires_grad_(True)
        z = (torch.sigmoid((phi + u.log() - (1 - u).log()) / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
        torch.testing.assert_close(sample.z, z.detach(), rtol=1e-5, atol=1e-6)
        z.sum().backward()
        torch.testing.assert_close(g.dz_dphi_(sample.z.clone()), phi.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sample.sparsity, (z == 0).float().mean(1))
    # the reference's noise is within 4e-6 of none: z = clamp(1.2 sigmoid(1.5 phi) - 0.1)
    ref = (torch.sigmoid(1.5 * g.logits.detach()) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(sample.z, ref, atol=1e-5, rtol=0)


def test_real_noise_makes_gates_stochastic():
    g = _gates()
    a = g.sample(0).z
    b = g.sample(1).z
    assert torch.equal(a, g.sample(0).z)
    assert not torch.equal(a, b)


def test_test_time_sparsity_by_threshold_equals_counting_the_gates():
    for structured in (False, True):
        g = _gates(structured)
        with torch.no_grad():
            g.logits.copy_(torch.randn(g.logits.shape) * 3)
        torch.testing.assert_close(g.test_sparsity(), g.sparsity(g.deterministic()))


def test_sparsity_counts_parameters_per_expert():
    g = _gates(structured=True)  # groups: 4 columns x3, 3 biases, 2 channels x4 -> 9 groups
    assert g.layout.num_groups == 9
    assert float(g.layout.group_sizes.sum()) == 23
    z = torch.ones(3, 9)
    z[0, :4] = 0  # expert 0: the whole 3x4 weight is off -> 12/23 zeros
    z[1, 7] = 0  # expert 1: one conv channel -> 4/23
    z[2, 4] = 0.0  # expert 2: one bias -> 1/23
    torch.testing.assert_close(g.sparsity(z), torch.tensor([12 / 23, 4 / 23, 1 / 23]))


def test_structured_expand_and_reduce_are_adjoint():
    layout = GateLayout(SLOTS, structured=True)
    gvals = torch.randn(9)
    v = torch.randn(23)
    lhs = (layout.expand(gvals) * v).sum()
    rhs = (gvals * layout.reduce(v)).sum()
    torch.testing.assert_close(lhs, rhs)
    # columns of the 2-D weight share a gate: element (r, c) -> group c
    assert layout.group_index[:12].view(3, 4).tolist() == [[0, 1, 2, 3]] * 3


def test_clamp_keeps_logits_within_ln100():
    g = _gates()
    with torch.no_grad():
        g.logits.fill_(50.0)
        g.logits[0, 0] = -50.0
    g.clamp_()
    assert float(g.logits.detach().max()) == pytest.approx(math.log(100))
    assert float(g.logits.detach().min()) == pytest.approx(-math.log(100))
