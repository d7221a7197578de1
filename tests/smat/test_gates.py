import math

import pytest
import torch

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.gates import GateLayout, HardConcreteGates
from smat_dist.smat.noise import counter_uniform

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
    kw.setdefault("kernel", "eager")
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


def _dz_dphi(gates, keys):
    """dz/dφ of a draw, from the flush pass with one unit row per expert and no density term."""
    M, G = gates.logits.shape
    return gates.flush_grad(keys, torch.eye(M), torch.ones(M, G), None)


def test_training_gates_follow_the_hard_concrete_formula_and_derivative():
    for noise in ("hard_concrete", "reference"):
        g = _gates(noise=noise)
        keys = g.keys(3)
        sample = g.sample(3)
        assert torch.equal(sample.keys, keys)
        # the noise of (expert m, group j) is the counter generator's value at (keys_m, j)
        u = counter_uniform(keys, 0, 23)
        lo, hi = (1e-6, 1 - 1e-6) if noise == "hard_concrete" else (0.5 - 1e-6, 0.5 + 1e-6)
        u = u * (hi - lo) + lo
        phi = g.logits.detach().clone().requires_grad_(True)
        z = (torch.sigmoid((phi + u.log() - (1 - u).log()) / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
        torch.testing.assert_close(g.draw(keys), z.detach(), rtol=1e-5, atol=1e-6)
        z.sum().backward()
        torch.testing.assert_close(_dz_dphi(g, keys), phi.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sample.sparsity, (z == 0).float().mean(1))
    # the reference's noise is within 4e-6 of none: z = clamp(1.2 sigmoid(1.5 phi) - 0.1)
    ref = (torch.sigmoid(1.5 * g.logits.detach()) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(g.draw(keys), ref, atol=1e-5, rtol=0)


def test_real_noise_makes_gates_stochastic():
    g = _gates()
    a = g.draw(g.keys(0))
    b = g.draw(g.keys(1))
    assert torch.equal(a, g.draw(g.keys(0)))
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


# ---------------------------------------------------------------- the counter noise and the draw's law

def test_counter_noise_is_a_pure_function_of_key_and_counter():
    """Any slice of the counters gives the same words: chunking and order never change the noise."""
    from smat_dist.smat.noise import counter_bits, expert_keys

    keys = expert_keys(12345, 4)
    assert keys.dtype == torch.int32 and keys.shape == (4, 2)
    assert torch.equal(keys, expert_keys(12345, 4)) and not torch.equal(keys, expert_keys(12346, 4))
    whole = counter_bits(keys, 0, 1000)
    pieces = torch.cat([counter_bits(keys, a, b - a) for a, b in ((0, 7), (7, 500), (500, 1000))], 1)
    assert torch.equal(whole, pieces)
    assert torch.equal(counter_bits(keys[2:3], 300, 5), whole[2:3, 300:305])  # an expert alone
    u = counter_uniform(keys, 0, 1000)
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    # exactly (k + 1/2)·2^-23 for an integer k: the float32 conversion loses nothing
    k = u.double() * 2 ** 23 - 0.5
    assert torch.equal(k, k.round())


def test_counter_noise_is_uniform_and_uncorrelated():
    """1M uniforms per expert: moments, a 64-bin chi-square, and no correlation between neighbouring
    counters, experts or streams (the tolerances are ~5 standard errors)."""
    from smat_dist.smat.noise import expert_keys

    n = 1 << 20
    u = counter_uniform(expert_keys(7, 3), 0, n).double()
    se = 1 / math.sqrt(n)
    assert (u.mean(1) - 0.5).abs().max() < 5 * se * math.sqrt(1 / 12)
    assert (u.var(1) - 1 / 12).abs().max() < 5 * se * math.sqrt(1 / 180)
    counts = torch.stack([torch.histc(row.float(), bins=64, min=0, max=1) for row in u])
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum(1)  # 63 degrees of freedom: mean 63, sd 11.2
    assert float(chi2.max()) < 63 + 5 * 11.2
    c = u - 0.5
    for a, b in ((c[0, :-1], c[0, 1:]), (c[0], c[1]), (c[1], c[2]),
                 (c[0], counter_uniform(expert_keys(8, 3), 0, n)[0].double() - 0.5)):
        corr = float((a * b).mean() / (a.std() * b.std()))
        assert abs(corr) < 5 * se, corr


def test_the_draw_has_the_hard_concrete_law(monkeypatch):
    """With the real counter noise, over 2^17 gates per logit value: P(z ≠ 0) = 1 - Q(0; φ) (the
    expected density E), P(z = 1) and P(z ≤ ½) have their closed forms, and the draw's counted
    sparsity is the share of exact zeros, all within 5 binomial standard errors."""
    monkeypatch.setattr("smat_dist.smat.gates.CHUNK_ELEMENTS", 1 << 18)  # (chunking is tested elsewhere)
    n = 1 << 17
    layout = GateLayout([ParamSlot("b", torch.Size([n]), 0, n)], structured=False)
    g = HardConcreteGates(layout, GateConfig(num_experts=4, kernel="eager"))
    values = torch.tensor([-2.5, -0.5, 0.7, 3.0])
    with torch.no_grad():
        g.logits.copy_(values[:, None].expand(4, n))
    draw = g.sample(2024)
    z = g.draw(draw.keys)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1

    def logit(p):
        return math.log(p / (1 - p))

    p_nonzero = 1 - torch.sigmoid(beta * math.log(-gamma / zeta) - values).double()
    p_one = torch.sigmoid(values - beta * logit((1 - gamma) / (zeta - gamma))).double()
    p_half = torch.sigmoid(beta * logit((0.5 - gamma) / (zeta - gamma)) - values).double()
    for measured, p in (((z != 0).double().mean(1), p_nonzero), ((z == 1).double().mean(1), p_one),
                        ((z <= 0.5).double().mean(1), p_half), (1 - draw.sparsity.double(), p_nonzero)):
        se = (p * (1 - p) / n).sqrt()
        assert bool(((measured - p).abs() < 5 * se + 1e-12).all()), (measured, p)
    torch.testing.assert_close(g.density_value().double(), p_nonzero, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(draw.sparsity, g.sparsity(z))


def test_compiled_passes_equal_the_eager_ones():
    """One torch.compile kernel per pass over every column gives the eager chunks' results: the same
    noise bits (exact counts), the merge, ∇α and the flush to float rounding."""
    torch.manual_seed(0)
    n = 4099  # not a multiple of any vector width: exercises the kernels' tails
    layout = GateLayout([ParamSlot("w", torch.Size([n]), 0, n)], structured=False)
    eager = HardConcreteGates(layout, GateConfig(num_experts=3, kernel="eager"))
    compiled = HardConcreteGates(layout, GateConfig(num_experts=3, kernel="compiled"))
    with torch.no_grad():
        compiled.logits.copy_(eager.logits * 4)
        eager.logits.copy_(compiled.logits)
    assert compiled.compiled and not eager.compiled
    keys = eager.keys(99)
    a, b = eager.sample(99), compiled.sample(99)
    assert torch.equal(a.sparsity, b.sparsity)
    torch.testing.assert_close(compiled.draw(keys), eager.draw(keys), rtol=1e-6, atol=1e-7)
    assert torch.equal(compiled.draw(keys) == 0, eager.draw(keys) == 0)
    alpha, row = torch.tensor([0.2, 0.5, 0.3]), torch.randn(n)
    for x, y in zip(compiled.merge_mask(a, alpha, with_density=True), eager.merge_mask(a, alpha, with_density=True)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # an unmeasured draw is counted inside an eager merge (the count pass's exact numbers); compiled,
    # the count keeps its own pass
    for gates in (eager, compiled):
        draw = gates.sample(99, measure=False)
        mask, _ = gates.merge_mask(draw, alpha)
        torch.testing.assert_close(mask, eager.merge_mask(a, alpha)[0], rtol=1e-5, atol=1e-6)
        if gates is eager:
            assert torch.equal(draw.sparsity, a.sparsity)
        else:
            assert draw.sparsity is None and torch.equal(gates.measure(draw), a.sparsity)
    torch.testing.assert_close(compiled.alpha_grad(keys, row), eager.alpha_grad(keys, row), rtol=1e-5, atol=1e-4)
    alphas, rows, coef = torch.rand(2, 3), torch.randn(2, n), torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(compiled.flush_grad(keys, alphas, rows, coef), eager.flush_grad(keys, alphas, rows, coef),
                               rtol=1e-5, atol=1e-6)
    # ∇α of every task from the flush pass: each task's own ∇α pass, exactly when eager
    for gates, tol in ((eager, 0), (compiled, 1e-4)):
        grad_phi, alpha_grads = gates.flush_grad(keys, alphas, rows, coef, with_alpha_grad=True)
        torch.testing.assert_close(grad_phi, eager.flush_grad(keys, alphas, rows, coef), rtol=1e-5, atol=1e-6)
        for t in range(2):
            torch.testing.assert_close(alpha_grads[t], eager.alpha_grad(keys, rows[t]), rtol=tol, atol=tol)
    assert torch.equal(compiled.test_sparsity(), eager.test_sparsity())
    from smat_dist.smat import gates as gates_module

    assert not gates_module._COMPILE_FAILED, "torch.compile failed (a C++ compiler is needed; .ci/run installs g++)"
