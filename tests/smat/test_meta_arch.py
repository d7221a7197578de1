import dataclasses

import pytest
import torch

from smat_dist.train.config import TrainConfig
from smat_dist.smat import SMAT
from smat_dist.smat.backbone import features
from smat_dist.smat.protonet import cosine_logits, prototypes
from smat_dist.train.launch import Trainer

from .conftest import tiny_model_config


def _with(cfg, **sections):
    """Replace fields of nested config sections: _with(cfg, gates=dict(num_experts=2))."""
    out = {}
    for name, changes in sections.items():
        cur = getattr(cfg, name)
        out[name] = dataclasses.replace(cur, **changes) if isinstance(changes, dict) else changes
    return dataclasses.replace(cfg, **out)


def test_gradients_reach_delta_gates_hypernet_and_lambda_but_not_theta_pre(tiny_cfg, toy):
    model = SMAT(tiny_cfg)
    with torch.no_grad():  # away from the init (θδ = 0, λ = 0) where some paths are exactly zero
        model.delta.normal_(0, 1e-2)
        model.lagrange.fill_(0.5)
    ctx = model.begin_step(0, seed=0)
    ctx.constraint()  # settles the step's constraint, which may reset satisfied experts' λ
    model.lagrange.data.fill_(0.5)  # keep all active
    out = model(toy.episode(0), ctx, task_index=0, last=True)
    out.loss.backward()
    hn = dict(model.hypernet.named_parameters())
    for name, p in [("delta", model.delta), ("logits", model.gates.logits), ("lambda", model.lagrange),
                    ("keys", hn["keys"]), ("tokens", hn["tokens"]), ("qkv", hn["block.qkv.weight"])]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert model.theta_pre.grad is None


def test_theta_pre_is_untouched_by_training_and_shared_with_the_backbone(tiny_cfg, toy):
    model = SMAT(tiny_cfg)
    before = model.theta_pre.clone()
    trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=2, max_steps=3))
    trainer.fit(toy, steps=3)
    assert torch.equal(model.theta_pre, before)
    assert float(model.delta.detach().abs().sum()) > 0  # ...while θδ did move
    slot = model.space.slots[0]
    p = dict(model.backbone.named_parameters())[slot.name]
    assert p.data_ptr() == model.theta_pre.data_ptr() + slot.offset * p.element_size()


def test_all_gates_off_at_test_time_is_the_pretrained_protonet(tiny_cfg, toy):
    model = SMAT(tiny_cfg).eval()
    with torch.no_grad():
        model.delta.normal_()
        model.gates.logits.fill_(-10.0)
    model.gates.clamp_()
    ep = toy.episode(1)
    theta = model.task_weights(ep.support_x, ep.support_y)
    assert torch.equal(theta, model.theta_pre)
    with torch.no_grad():
        head = prototypes(features(model.backbone, None, ep.support_x), ep.support_y, 5)
        pre_logits = cosine_logits(features(model.backbone, None, ep.query_x), head, 10.0)
    assert torch.equal(model.predict(ep.support_x, ep.support_y, ep.query_x), pre_logits)


def test_all_gates_on_and_a_single_expert_gives_theta_pre_plus_delta(tiny_cfg, toy):
    cfg = _with(tiny_cfg, gates=dict(num_experts=1), hypernet=dict(enabled=False))
    model = SMAT(cfg).eval()
    with torch.no_grad():
        model.delta.normal_()
        model.gates.logits.fill_(10.0)
    model.gates.clamp_()
    ep = toy.episode(2)
    assert torch.equal(model.task_weights(ep.support_x, ep.support_y), model.theta_pre + model.delta[0])


def test_lambda_grows_while_too_dense_and_is_zero_once_sparser(tiny_cfg, toy):
    cfg = _with(tiny_cfg, gates=dict(num_experts=2, target_sparsity=0.5),
                optim=dataclasses.replace(tiny_cfg.optim, warmup_epochs=0, mask_lr=0.0))
    model = SMAT(cfg)
    with torch.no_grad():
        model.gates.logits.fill_(3.0)  # nearly every gate on: sparsity ~0 < tau
    trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1000, max_steps=4))
    lams = []
    for s in range(4):
        m = trainer.train_step(list(toy.iterate(range(2 * s, 2 * s + 2))))
        assert max(m.sparsity) < 0.5
        lams.append(model.lagrange.detach().clone())
    for a, b in zip(lams, lams[1:]):
        assert bool((b > a).all()), (a, b)
    with torch.no_grad():
        model.gates.logits.fill_(-4.0)  # every gate off: sparsity 1 > tau
    ctx = model.begin_step(trainer.step, 0)
    assert bool((ctx.sparsity > 0.5).all())
    assert torch.equal(model.lagrange.detach(), torch.zeros(2))


def test_toy_run_sparsity_converges_to_tau():
    tau = 0.6
    cfg = tiny_model_config()
    cfg = _with(cfg, gates=dict(num_experts=2, target_sparsity=tau),
                lagrangian=dict(lr=2.0, project_nonneg=True, reset_when_satisfied=True),
                optim=dataclasses.replace(cfg.optim, warmup_epochs=0, mask_lr=1e4),
                teacher=dict(enabled=False, kd_weight=0.0), inner=dict(steps=1, lr=1e-3))
    from smat_dist.smat.toy import ToyEpisodes

    toy = ToyEpisodes(num_classes=10, image_size=16, ways=3, shots=1, queries=1, seed=1)
    model = SMAT(cfg)
    trainer = Trainer(model, TrainConfig(tasks_per_step=1, tasks_per_epoch=10**6))
    history = []
    trainer.fit(toy, steps=150, on_step=lambda m: history.append(m.sparsity))
    tail = torch.tensor(history[-20:])  # the last 20 steps, both experts
    assert float((tail - tau).abs().max()) <= 0.02, tail
    assert float(torch.tensor(history[0]).max()) < tau - 0.1  # it really had to move


def test_dense_teacher_lowers_the_query_loss(tiny_cfg, toy):
    # The step size must suit the backbone: a random 1-block ViT has far larger gradients than
    # DINO ViT-S (for which the reference's 5e-3 is meant), so the test uses 2e-4.
    ces = {}
    for steps in (1, 3):
        torch.manual_seed(0)
        model = SMAT(_with(tiny_cfg, teacher=dict(steps=steps, lr=2e-4)))
        with torch.no_grad():
            model.delta.normal_(0, 1e-3)
        ctx = model.begin_step(0, 0)
        for g in range(200, 206):
            m = model(toy.episode(g), ctx, task_index=g, last=(g == 205)).metrics
            ces[steps, g] = (float(m["query_ce"]), float(m["teacher_ce"]))
    for g in range(200, 206):
        student, teacher1 = ces[1, g]
        assert ces[3, g][0] == pytest.approx(student)  # same student either way
        assert teacher1 < student, g
        assert ces[3, g][1] < teacher1, g  # more teacher steps, lower query loss


def test_teacher_shortcut_equals_a_separate_teacher_forward(tiny_cfg, toy):
    """The first teacher step reuses the student's query graph; a fresh forward gives the same teacher."""
    model = SMAT(tiny_cfg)
    with torch.no_grad():
        model.delta.normal_(0, 1e-2)
    ep = toy.episode(7)
    ctx = model.begin_step(0, 0)  # once: begin_step advances the spectral-norm power iteration
    shared = model(ep, ctx, 7, last=False).metrics
    model._reuse_student_graph = False
    separate = model(ep, ctx, 7, last=False).metrics
    assert float(shared["teacher_ce"]) == pytest.approx(float(separate["teacher_ce"]), rel=1e-5)
    assert float(shared["kd"]) == pytest.approx(float(separate["kd"]), rel=1e-5)
    assert float(shared["teacher_ce"]) != pytest.approx(float(shared["query_ce"]), rel=1e-3)


def _grads(model):
    named = {"delta": model.delta, "logits": model.gates.logits, "lambda": model.lagrange,
             **{f"hypernet.{k}": v for k, v in model.hypernet.named_parameters()}}
    return {k: v.grad.clone() for k, v in named.items()}


def test_a_summed_backward_of_a_steps_tasks_gives_the_one_at_a_time_gradients(tiny_cfg, toy):
    """A batched step (one backward of the summed task losses, or the tasks last-first) against
    meta_step's order; without ``joint_backward`` a summed backward refuses instead of dropping
    ∇φ and ∇α."""
    model = SMAT(_with(tiny_cfg, gates=dict(num_experts=3)))
    with torch.no_grad():
        model.delta.normal_(0, 1e-2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    episodes = list(toy.iterate(range(3)))

    def step_losses(*, joint_backward, backward_each=False):
        model.load_state_dict(initial)  # begin_step power-iterates and resets λ: same start each time
        model.zero_grad(set_to_none=True)
        ctx = model.begin_step(0, 0, tasks=3, joint_backward=joint_backward)
        model.lagrange.data.fill_(0.5)  # keep every expert's λ term active
        losses = []
        for j, ep in enumerate(episodes):
            losses.append(model(ep, ctx, task_index=ep.index, last=j == 2).loss)
            if backward_each:
                losses[-1].backward()
        return losses

    step_losses(joint_backward=False, backward_each=True)
    base = _grads(model)
    assert float(base["logits"].abs().sum()) > 0 and float(base["hypernet.keys"].abs().sum()) > 0
    for order in ("summed", "reversed"):
        losses = step_losses(joint_backward=True)
        if order == "summed":
            sum(losses).backward()
        else:
            for loss in reversed(losses):
                loss.backward()
        got = _grads(model)
        for k in base:
            torch.testing.assert_close(got[k], base[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{order} {k}: {m}")
    losses = step_losses(joint_backward=False)
    with pytest.raises(RuntimeError, match="joint_backward=True"):
        sum(losses).backward()


def test_bf16_model_feeds_the_merge_fp32_and_gets_fp32_back(tiny_cfg, toy, monkeypatch):
    """Under precision=bf16 the backbone is the only bf16 region: α reaches the merge in fp32,
    θ_i comes back fp32 and equals an fp32 merge of the same inputs outside any autocast."""
    import smat_dist.smat.meta_arch as meta_arch
    from smat_dist.smat.merge import MergePlan, merge as real_merge

    calls = []

    def recording_merge(pre, delta, logits, alpha, plan, **flags):
        out = real_merge(pre, delta, logits, alpha, plan, **flags)
        calls.append((alpha.detach().clone(), plan.gates.draw(plan.keys), out[0] if isinstance(out, tuple) else out))
        return out

    monkeypatch.setattr(meta_arch, "merge", recording_merge)
    model = SMAT(dataclasses.replace(tiny_cfg, precision="bf16"))
    with torch.no_grad():
        model.delta.normal_(0, 1e-2)
    ctx = model.begin_step(0, 0)
    out = model(toy.episode(0), ctx, task_index=0, last=False)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    (alpha, z, theta), = calls
    assert alpha.dtype == torch.float32 and theta.dtype == torch.float32
    with torch.no_grad():
        expected = real_merge(model.theta_pre, model.delta, None, alpha,
                              MergePlan(model.layout, meta_arch.GateSample(z, stochastic=False)))
    # the training merge recomputes z inside its fused pass; the given-z merge is a matmul
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-6, atol=1e-7)


def _counting_passes(monkeypatch):
    from smat_dist.smat.gates import HardConcreteGates

    passes = []
    run = HardConcreteGates._run
    monkeypatch.setattr(HardConcreteGates, "_run",
                        lambda self, name, *a, **k: passes.append((name, k.get("with_count", False))) or run(self, name, *a, **k))
    return passes


def test_the_steps_first_merge_counts_its_draw(tiny_cfg, toy, monkeypatch):
    """No count pass of its own: the first task's merge measures the draw (the count pass's exact
    numbers), and satisfied experts' λ is reset before the step's first loss reads it."""
    from smat_dist.smat.meta_arch import stream_seed

    model = SMAT(_with(tiny_cfg, gates=dict(num_experts=2, target_sparsity=0.3)))
    with torch.no_grad():
        model.gates.logits[0].fill_(-3.0)  # expert 0 sparse (satisfied), expert 1 dense
        model.gates.logits[1].fill_(3.0)
        model.lagrange.fill_(0.7)
    want = model.gates.sample(stream_seed("gates", 0, 4)).sparsity
    passes = _counting_passes(monkeypatch)
    ctx = model.begin_step(4, seed=0, tasks=2)
    assert passes == [] and torch.equal(model.lagrange.detach(), torch.full((2,), 0.7))  # nothing measured yet
    out = model(toy.episode(0), ctx, task_index=0, last=False)
    assert passes[0] == ("merge", True) and ("count", False) not in passes
    assert torch.equal(ctx.sparsity, want) and want[0] > 0.3 > want[1]
    assert torch.equal(model.lagrange.detach(), torch.tensor([0.0, 0.7]))
    assert torch.equal(out.metrics["lagrangian_term"], (ctx.violation * model.lagrange).sum().detach())


def test_a_step_without_tasks_counts_its_draw_on_first_read(tiny_cfg, monkeypatch):
    """(A rank with no task in a step: recipe.meta_step reads the constraint before λ steps.)"""
    from smat_dist.smat.meta_arch import stream_seed

    model = SMAT(tiny_cfg)
    want = model.gates.sample(stream_seed("gates", 3, 0)).sparsity
    passes = _counting_passes(monkeypatch)
    ctx = model.begin_step(0, seed=3)
    assert torch.equal(ctx.sparsity, want) and passes == [("count", False)]
    assert torch.equal(ctx.violation, want - tiny_cfg.gates.target_sparsity)


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_alpha_grad_in_the_flush_trains_bit_for_bit_as_a_pass_per_task(tiny_cfg, toy, monkeypatch, kernel):
    """gates.alpha_grad=flush (every task's ∇α from the flush pass, the hypernetwork's backward deferred
    there) against =task (a ∇α pass in each task's backward): identical parameters after three meta-steps
    of three tasks, and no ∇α pass at all."""
    states = {}
    for where in ("task", "flush"):
        torch.manual_seed(0)
        model = SMAT(_with(tiny_cfg, gates=dict(alpha_grad=where, kernel=kernel),
                           optim=dataclasses.replace(tiny_cfg.optim, warmup_epochs=0)))
        with torch.no_grad():
            model.delta.normal_(0, 1e-2)  # θδ = 0 would make every ∇α zero
        init = model.hypernet.keys.detach().clone()
        trainer = Trainer(model, TrainConfig(tasks_per_step=3, tasks_per_epoch=1000, max_steps=3))
        passes = _counting_passes(monkeypatch)
        for s in range(3):
            trainer.train_step(list(toy.iterate(range(3 * s, 3 * s + 3))))
        assert any(name == "alpha_grad" for name, _ in passes) == (where == "task")
        states[where] = {k: v.clone() for k, v in model.state_dict().items()}
        monkeypatch.undo()
    assert not torch.equal(states["flush"]["hypernet.keys"], init)  # the hypernetwork did learn
    for key, value in states["task"].items():
        assert torch.equal(states["flush"][key], value), key


def test_own_task_draws_are_not_counted(tiny_cfg, toy, monkeypatch):
    """noise_scope=task: the step's draw (the one the constraint reads) is counted once on its own; the
    tasks' own draws are merged without a count nobody reads."""
    model = SMAT(_with(tiny_cfg, gates=dict(noise_scope="task")))
    passes = _counting_passes(monkeypatch)
    ctx = model.begin_step(0, seed=1, tasks=2)
    for j in range(2):
        model(toy.episode(j), ctx, task_index=j, last=j == 1).loss.backward()
    assert [p for p in passes if p[0] in ("count", "merge")] == [("merge", False), ("count", False), ("merge", False)]
