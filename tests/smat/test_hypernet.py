import pytest
import torch

from smat_dist.smat.config import HypernetConfig
from smat_dist.smat.hypernet import Hypernetwork, SpectralLinear


def test_alpha_is_a_distribution_and_deterministic_at_test_time():
    h = Hypernetwork(32, 8, HypernetConfig())
    protos = torch.randn(5, 32)
    for stochastic in (True, False):
        alpha, logits = h(protos, 2.0, generator=torch.Generator().manual_seed(0), stochastic=stochastic)
        assert alpha.shape == (8,) and logits.shape == (8,)
        assert float(alpha.detach().sum()) == pytest.approx(1.0, abs=1e-6)
        assert bool((alpha >= 0).all())
    a1, _ = h(protos, 2.0, stochastic=False)
    a2, _ = h(protos, 2.0, stochastic=False)
    assert torch.equal(a1, a2)
    s1, _ = h(protos, 2.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(s1, a1)


def test_temperature_schedule_counts_tasks():
    h = Hypernetwork(32, 4, HypernetConfig())
    assert h.temperature(0) == 5.0
    assert h.temperature(4000) == pytest.approx(4.0)
    assert h.temperature(18000) == pytest.approx(0.5)
    assert h.temperature(50000) == 0.5


def test_keys_and_tokens_are_registered_trained_and_saved():
    h = Hypernetwork(32, 4, HypernetConfig())
    names = dict(h.named_parameters())
    assert "keys" in names and "tokens" in names  # D2: the reference loses both
    sd = h.state_dict()
    assert "keys" in sd and "tokens" in sd and "block.qkv.u" in sd
    alpha, logits = h(torch.randn(3, 32), 1.0, generator=torch.Generator().manual_seed(0))
    (alpha[0] + logits.pow(2).mean()).backward()
    for n in ("keys", "tokens", "block.qkv.weight", "block.fc2.bias"):
        assert names[n].grad is not None and float(names[n].grad.abs().sum()) > 0, n


def test_pooling_options_change_the_embedding():
    protos = torch.randn(4, 32)
    outs = []
    for pool in ("class0", "mean", "tokens"):
        torch.manual_seed(0)
        outs.append(Hypernetwork(32, 4, HypernetConfig(pool=pool))(protos, 1.0, stochastic=False)[1])
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_spectral_linear_divides_by_the_top_singular_value():
    lin = SpectralLinear(6, 5)
    lin.power_iteration_(100)
    top = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    eff = lin.effective_weight().detach()
    assert float(torch.linalg.matrix_norm(eff, ord=2)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(eff * top, lin.weight.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stochastic", [True, False])
def test_hypernetwork_runs_in_fp32_under_bf16_autocast(stochastic):
    """α, the selection logits and their noise are fp32 and identical to a plain fp32 forward, and
    so are the gradients (bf16 autocast once crashed in the spectral norm's uᵀWv)."""
    h = Hypernetwork(32, 8, HypernetConfig())
    protos = torch.randn(5, 32)
    runs = []
    for autocast in (False, True):
        h.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            # bf16 prototypes, as a bf16 backbone would give them
            inputs = protos.to(torch.bfloat16).float() if not autocast else protos.to(torch.bfloat16)
            alpha, logits = h(inputs, 2.0, generator=torch.Generator().manual_seed(0), stochastic=stochastic)
            assert alpha.dtype == torch.float32 and logits.dtype == torch.float32
        (alpha[0] + logits.pow(2).mean()).backward()  # outside autocast, as torch recommends
        runs.append([alpha.detach(), logits.detach(), h.keys.grad.clone(), h.block.qkv.weight.grad.clone()])
    for plain, autocast in zip(*runs):
        assert torch.equal(plain, autocast)


def test_spectral_power_iteration_is_fp32_under_autocast():
    lin = SpectralLinear(6, 5)
    plain = SpectralLinear(6, 5)
    plain.load_state_dict(lin.state_dict())
    plain.power_iteration_(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin.power_iteration_(3)
    assert torch.equal(lin.u, plain.u) and torch.equal(lin.v, plain.v)
