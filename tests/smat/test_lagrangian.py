"""The sparsity constraint's multiplier update: per-expert dual ascent (default) against the authors'
α-weighted update, and the floor that keeps the constraint's learning rates from annealing away
(docs/algorithm.md#d10-lagrange-multiplier)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from smat_dist.train.config import TrainConfig
from smat_dist.smat import SMAT
from smat_dist.smat.config import OptimConfig
from smat_dist.smat.optim import apply_schedule, build_optimizer, lr_multiplier
from smat_dist.train.launch import Trainer

from .test_meta_arch import _with


def _frozen_gates(cfg, *, M, tau, update, hypernet=True):
    """Gates that cannot move (mask lr 0): the measured sparsity stays where the test puts it."""
    return _with(cfg, gates=dict(num_experts=M, target_sparsity=tau), hypernet=dict(enabled=hypernet),
                 lagrangian=dict(update=update),
                 optim=dataclasses.replace(cfg.optim, warmup_epochs=0, mask_lr=0.0))


@pytest.mark.parametrize("update", ["dual", "reference"])
def test_one_lambda_step_is_the_modes_update(tiny_cfg, toy, update):
    model = SMAT(_frozen_gates(tiny_cfg, M=2, tau=0.5, update=update))
    with torch.no_grad():
        model.gates.logits.fill_(3.0)
    m = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1000)).train_step(list(toy.iterate(range(2))))
    step = 2e-3 * (0.5 - torch.tensor(m.sparsity))
    if update == "reference":  # the authors': weighted by the mean selection weight of the step's tasks
        step = step * torch.tensor(m.alpha_mean)
    torch.testing.assert_close(model.lagrange.detach(), step, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(torch.tensor(m.alpha_mean), torch.full((2,), 1.0))  # the two modes do differ


def test_dual_ascent_moves_each_lambda_with_its_own_violation_only(tiny_cfg, toy):
    """Expert 0 already sparser than τ, expert 1 too dense: λ_0 stays 0, λ_1 grows by lr·(τ − s_1) per step
    whatever the hypernetwork's α, and stops (is reset) once expert 1 meets τ."""
    tau, lr = 0.5, 0.01
    model = SMAT(_with(_frozen_gates(tiny_cfg, M=2, tau=tau, update="dual"), lagrangian=dict(lr=lr)))
    with torch.no_grad():
        model.gates.logits[0].fill_(-4.0)  # expert 0 (nearly) all closed: s_0 > τ
        model.gates.logits[1].fill_(3.0)  # expert 1 nearly all open: s_1 ≈ 0 < τ
    trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1000))
    lam, alphas = [model.lagrange.detach().clone()], []
    for s in range(4):
        m = trainer.train_step(list(toy.iterate(range(2 * s, 2 * s + 2))))
        assert m.sparsity[0] > tau > m.sparsity[1]
        alphas.append(m.alpha_mean)
        lam.append(model.lagrange.detach().clone())
        assert float(lam[-1][0]) == 0.0
        assert float(lam[-1][1] - lam[-2][1]) == pytest.approx(lr * (tau - m.sparsity[1]), rel=1e-5)
    assert max(abs(a[1] - 0.5) for a in alphas) > 1e-3  # α was not uniform, and did not enter the step
    with torch.no_grad():
        model.gates.logits[1].fill_(-4.0)  # expert 1 now meets τ
    m = trainer.train_step(list(toy.iterate(range(8, 10))))
    assert min(m.sparsity) > tau and torch.equal(model.lagrange.detach(), torch.zeros(2))


def _penalty_logit_grad(tiny_cfg, toy, *, M, update):
    """∇φ of one task with θδ = 0 (no task gradient reaches the gates: only the L0 penalty does),
    uniform α (no hypernetwork), λ = 1 and the same logits for every expert."""
    torch.manual_seed(0)
    model = SMAT(_frozen_gates(tiny_cfg, M=M, tau=0.5, update=update, hypernet=False))
    with torch.no_grad():
        row = torch.randn(model.gates.logits.shape[1], generator=torch.Generator().manual_seed(1))
        model.gates.logits.copy_(row.expand_as(model.gates.logits))
    ctx = model.begin_step(0, seed=0)
    model.lagrange.data.fill_(1.0)
    model(toy.episode(0), ctx, task_index=0, last=True).loss.backward()
    return model.gates.logits.grad[0].clone()


def test_dual_penalty_push_per_expert_does_not_depend_on_M(tiny_cfg, toy):
    """At uniform α and equal λ the penalty's gradient on an expert's logits is the same for M = 2 and 8 in
    dual mode; the authors' ᾱ_m = 1/M weight makes it 4× weaker at M = 8 (and λ grows 4× slower: 1/M²)."""
    dual = {M: _penalty_logit_grad(tiny_cfg, toy, M=M, update="dual") for M in (2, 8)}
    ref = {M: _penalty_logit_grad(tiny_cfg, toy, M=M, update="reference") for M in (2, 8)}
    assert float(dual[2].abs().sum()) > 0
    torch.testing.assert_close(dual[8], dual[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(ref[8] * 4, ref[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(ref[2] * 2, dual[2], rtol=1e-5, atol=0)  # M·ᾱ = 2·(1/2)


def test_reference_mode_is_the_authors_loss_terms_bit_for_bit(tiny_cfg, toy):
    """update=reference computes exactly the earlier code's terms: λ's term (s − τ)·λ·α per task and the L0
    penalty λ·Σ_t α_t·(E − (1 − τ)) on the step's last task (and so the same gradients)."""
    cfg = _with(tiny_cfg, gates=dict(num_experts=3, target_sparsity=0.7), lagrangian=dict(update="reference"))
    model = SMAT(cfg)
    with torch.no_grad():
        model.delta.normal_(0, 1e-2)
    ctx = model.begin_step(0, seed=0, tasks=2)
    model.lagrange.data.copy_(torch.tensor([0.3, 0.0, 1.2]))
    alpha_sum, grad = torch.zeros(3), torch.zeros(3)
    for j in range(2):
        out = model(toy.episode(j), ctx, task_index=j, last=j == 1)
        alpha = out.metrics["alpha"]
        alpha_sum += alpha
        grad += ctx.violation * alpha  # accumulated per task, as autograd does
        assert torch.equal(out.metrics["lagrangian_term"], (ctx.violation * model.lagrange * alpha).sum().detach())
        out.loss.backward()
    density = ctx.plan.density
    assert torch.equal(out.metrics["sparsity_penalty"],
                       (model.lagrange.detach() * alpha_sum * (density - (1 - 0.7))).sum())
    assert torch.equal(model.lagrange.grad, grad)


def test_constraint_groups_keep_a_floor_after_warmup_and_zero_floor_is_the_cosine():
    p = {k: [torch.nn.Parameter(torch.zeros(2))] for k in ("delta", "masks", "lagrange", "hypernet")}
    cfg = OptimConfig(warmup_epochs=2, total_epochs=10, constraint_lr_floor=0.4)
    opt = build_optimizer(p, cfg, lagrange_lr=0.1, project_lambda=True)
    base = {g["name"]: g["base_lr"] for g in opt.param_groups}
    for epoch in range(12):
        mult = apply_schedule(opt, epoch, cfg)
        assert mult == lr_multiplier(epoch, cfg)
        want = max(mult, 0.4) if epoch >= 2 else mult  # warm-up stays a warm-up for every group
        for g in opt.param_groups:
            expect = base[g["name"]] * (want if g["name"] in ("masks", "lagrange") else mult)
            assert g["lr"] == pytest.approx(expect, rel=1e-12), (epoch, g["name"])
    assert lr_multiplier(9, cfg) < 0.05  # the cosine itself does reach ≈ 0 at the end
    off = dataclasses.replace(cfg, constraint_lr_floor=0.0)
    for epoch in range(12):
        mult = apply_schedule(opt, epoch, off)
        assert all(g["lr"] == g["base_lr"] * mult for g in opt.param_groups)  # the authors' schedule, exactly


@pytest.mark.parametrize("bad", [dict(lagrangian=dict(update="sgd")), dict(optim=dict(constraint_lr_floor=1.5))])
def test_bad_constraint_settings_are_refused(tiny_cfg, bad):
    key = next(iter(bad))
    changes = {key: dataclasses.replace(getattr(tiny_cfg, key), **bad[key])}
    with pytest.raises(ValueError, match="update|constraint_lr_floor"):
        SMAT(dataclasses.replace(tiny_cfg, **changes))


@pytest.mark.parametrize("nonneg", [True, False])
def test_pi_penalty_uses_lambda_plus_the_proportional_part(tiny_cfg, toy, nonneg):
    """kp > 0: the L0 penalty's multiplier is λ_m − kp·(s_m − τ) (floored at 0 only while λ is projected
    to ≥ 0); λ itself stays the integral, its gradient unchanged. kp = 0 is λ itself."""
    tau, kp = 0.5, 2.0
    cfg = _with(tiny_cfg, gates=dict(num_experts=2, target_sparsity=tau),
                lagrangian=dict(kp=kp, project_nonneg=nonneg, reset_when_satisfied=False))
    model = SMAT(cfg)
    with torch.no_grad():
        model.delta.normal_(0, 1e-2)
        model.gates.logits[0].fill_(-4.0)  # expert 0 too sparse: the proportional part pushes it open
        model.gates.logits[1].fill_(3.0)  # expert 1 too dense
        model.lagrange.copy_(torch.tensor([0.05, 0.1]))
    ctx = model.begin_step(0, seed=0, tasks=1)
    v = ctx.violation
    assert v[0] > 0 > v[1]
    want = torch.tensor([0.05, 0.1]) - kp * v
    assert want[0] < 0  # the proportional part outweighs λ_0
    torch.testing.assert_close(ctx.multiplier, want.clamp_min(0) if nonneg else want, rtol=0, atol=1e-7)
    out = model(toy.episode(0), ctx, task_index=0, last=True)
    out.loss.backward()
    usage = out.metrics["alpha"] * 2
    torch.testing.assert_close(out.metrics["sparsity_penalty"],
                               (ctx.multiplier * usage * (ctx.plan.density - (1 - tau))).sum(), rtol=1e-6, atol=0)
    assert torch.equal(model.lagrange.grad, v)  # dual ascent on λ as before: d/dλ of Σ (s − τ)·λ
    off = SMAT(_with(tiny_cfg, gates=dict(num_experts=2, target_sparsity=tau)))
    with torch.no_grad():
        off.lagrange.copy_(torch.tensor([0.05, 0.1]))
    assert torch.equal(off.begin_step(0, seed=0).multiplier, off.lagrange.detach())


def test_negative_gain_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="kp"):
        SMAT(_with(tiny_cfg, lagrangian=dict(kp=-1.0)))


def _equality_run(tiny_cfg, toy, *, kp, steps=40):
    """Mean sparsity per step of a two-sided constraint (λ free in sign, no reset) at τ = 0.5, with θδ
    frozen at 0 so that only the L0 penalty moves the gates: the control loop alone."""
    cfg = _with(tiny_cfg, gates=dict(num_experts=2, target_sparsity=0.5),
                lagrangian=dict(kp=kp, lr=0.1, project_nonneg=False, reset_when_satisfied=False),
                optim=dataclasses.replace(tiny_cfg.optim, warmup_epochs=0, delta_lr=0.0, mask_lr=3e4))
    model = SMAT(cfg)
    trainer = Trainer(model, TrainConfig(tasks_per_step=1, tasks_per_epoch=100_000))
    return [sum(m.sparsity) / 2 for m in (trainer.train_step([toy.episode(i)]) for i in range(steps))]


def test_the_proportional_part_damps_the_equality_constraint(tiny_cfg, toy):
    """λ integrates the violation and the logits integrate λ: pure dual ascent on the equality overshoots τ
    far (and swings back); kp > 0 brings the sparsity to τ with little overshoot."""
    pure = _equality_run(tiny_cfg, toy, kp=0.0)
    pi = _equality_run(tiny_cfg, toy, kp=3.0)
    assert pure[0] < 0.3 and pi[0] < 0.3  # both start far too dense
    assert max(pure) - 0.5 > 0.25
    assert max(pi) - 0.5 < 0.06 and abs(pi[-1] - 0.5) < 0.04


def test_the_at_tau_demo_config_changes_only_the_constraint():
    from smat_dist.config import RunConfig, load_config
    from smat_dist.smat.config import LagrangianConfig

    configs = Path(__file__).resolve().parents[2] / "configs" / "demo"
    demo = load_config(RunConfig, [configs / "smat.yaml"])
    at_tau = load_config(RunConfig, [configs / "smat_at_tau.yaml"])
    assert at_tau.model.lagrangian == LagrangianConfig(update=demo.model.lagrangian.update, lr=0.1, kp=3.0,
                                                       project_nonneg=False, reset_when_satisfied=False)
    assert dataclasses.replace(at_tau.model, lagrangian=demo.model.lagrangian) == demo.model
    assert dataclasses.replace(at_tau.train, run_name=demo.train.run_name) == demo.train
    assert at_tau.data == demo.data and at_tau.dist == demo.dist
