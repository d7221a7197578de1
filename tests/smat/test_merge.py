"""The merge node against a plain-autograd implementation of θ = θ_pre + Σ_m α_m z_m ⊙ θδ(_m)."""

import pytest
import torch

from smat_dist.smat.backbone import ParamSlot
from smat_dist.smat.config import GateConfig
from smat_dist.smat.gates import GateDraw, GateLayout, GateSample, HardConcreteGates
from smat_dist.smat.merge import MergePlan, merge
from smat_dist.smat.noise import counter_uniform

SLOTS = [ParamSlot("w", torch.Size([4, 5]), 0, 20), ParamSlot("b", torch.Size([4]), 20, 4)]
N, M = 24, 3


@pytest.fixture(autouse=True, params=[1 << 18, 7], ids=["one-chunk", "many-chunks"])
def chunk_size(request, monkeypatch):
    monkeypatch.setattr("smat_dist.smat.gates.CHUNK_ELEMENTS", request.param)
    return request.param


def _gates(layout, **kw):
    return HardConcreteGates(layout, GateConfig(num_experts=M, kernel="eager", **kw))


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


def _noise(gates, seed):
    """The uniforms of ``gates.sample(seed)``, as the hard-concrete formula uses them."""
    u = counter_uniform(gates.keys(seed), 0, gates.logits.shape[1]).to(gates.logits.dtype)
    return u * (1 - 2e-6) + 1e-6


# How the step's three task losses are backpropagated:
#   one_at_a_time  forward+backward per task, the flushing task last (meta_step; default plan)
#   own_draw       every task has its own gate draw and flushes it (noise_scope="task")
#   summed         all forwards, then one backward of the summed losses (joint_backward plan)
#   reversed       all forwards, then one backward per task, last task first (joint_backward plan)
ORDERS = ["one_at_a_time", "own_draw", "summed", "reversed"]


def _run_tasks(order, layout, gates, pre, delta, alphas, weights, density_w, sample_seed=5):
    """Merge and backpropagate the tasks' losses <w_t, θ_t> (+ <density_w, E> on the last) in ``order``."""
    joint = order in ("summed", "reversed")
    shared = MergePlan(layout, gates.sample(sample_seed), gates=gates, capacity=2, joint_backward=joint)
    losses = []
    for t, (a, w) in enumerate(zip(alphas, weights)):
        last = t == len(alphas) - 1
        # an own draw is flushed by its task: each task gets a plan of its own (the same noise here)
        own = GateDraw(gates.keys(sample_seed))
        plan = MergePlan(layout, own, gates=gates) if order == "own_draw" else shared
        flush = last or order == "own_draw"
        if last:
            theta, density = merge(pre, delta, gates.logits, a, plan, flush=flush, with_density=True)
            loss = (theta * w).sum() + (density * density_w).sum()
        else:
            theta = merge(pre, delta, gates.logits, a, plan, flush=flush)
            loss = (theta * w).sum()
        _backpropagate(order, loss, losses, last=last)
    return density


def _backpropagate(order, loss, losses, *, last):
    """A task's loss: backpropagated now (``one_at_a_time``, ``own_draw``) or kept in ``losses``, which
    after the last task are backpropagated as ``order`` says."""
    if order in ("one_at_a_time", "own_draw"):
        loss.backward()
        return
    losses.append(loss)
    if last and order == "summed":
        sum(losses).backward()
    elif last and order == "reversed":
        for kept in reversed(losses):
            kept.backward()


def _three_tasks(*, seed, structured, interpolated, dtype=torch.float32, kernel="eager"):
    """Gates, θ_pre, θδ (one shared offset, or one per expert), three tasks' α and loss weights w_t
    (task t's loss = <w_t, θ_t>), drawn in this order from ``seed``."""
    torch.manual_seed(seed)
    layout = GateLayout(SLOTS, structured=structured)
    gates = HardConcreteGates(layout, GateConfig(num_experts=M, kernel=kernel)).to(dtype)
    pre = torch.randn(N, dtype=dtype)
    delta = torch.randn(1 if interpolated else M, N, dtype=dtype, requires_grad=True)
    alphas = [torch.softmax(torch.randn(M, dtype=dtype), 0).requires_grad_(True) for _ in range(3)]
    weights = [torch.randn(N, dtype=dtype) for _ in alphas]
    return layout, gates, pre, delta, alphas, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("interpolated", [True, False])
@pytest.mark.parametrize("order", ORDERS)
def test_merge_gradients_match_autograd(structured, interpolated, order, dtype):
    """Every merge mode and backward order against plain autograd through z(φ, u); an fp64 model
    stays fp64 throughout (its results match to fp64 precision)."""
    layout, gates, pre, delta, alphas, weights = _three_tasks(seed=0, structured=structured,
                                                              interpolated=interpolated, dtype=dtype)
    density_w = torch.tensor([0.5, -2.0, 1.5], dtype=dtype)  # a loss term on the expected density, folded into ∇φ
    density = _run_tasks(order, layout, gates, pre, delta, alphas, weights, density_w)

    u = _noise(gates, 5)
    phi = gates.logits.detach().clone().requires_grad_(True)
    d2 = delta.detach().clone().requires_grad_(True)
    a2 = [a.detach().clone().requires_grad_(True) for a in alphas]
    ref = _reference(pre, d2, phi, u, a2, structured, layout)
    q = torch.sigmoid(gates.l0_shift - phi).clamp(1e-6, 1 - 1e-6)
    sizes = layout.group_sizes.to(dtype) if structured else torch.ones(phi.shape[1], dtype=dtype)
    ref_density = ((1 - q) * sizes).sum(1) / N
    (sum((th * w).sum() for th, w in zip(ref, weights)) + (ref_density * density_w).sum()).backward()
    tol = {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert density.dtype == dtype
    torch.testing.assert_close(density.detach(), ref_density.detach(), **tol)

    z0 = gates.draw(gates.keys(5))
    for th_ref, a in zip(ref, alphas):  # forward values
        with torch.no_grad():
            th = merge(pre, delta, None, a, MergePlan(layout, GateSample(z0, stochastic=False)))
        assert th.dtype == dtype
        torch.testing.assert_close(th, th_ref.detach(), **tol)
    for got, want in [(delta.grad, d2.grad), (gates.logits.grad, phi.grad), *zip([a.grad for a in alphas], [a.grad for a in a2])]:
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("interpolated", [True, False])
def test_every_backward_order_gives_the_one_at_a_time_gradients(interpolated):
    """∇φ and ∇α are bit-identical (the flush reads the tasks in forward order whatever the
    backward order); ∇θδ sums the tasks in another order, so it agrees to fp32 rounding."""
    layout, gates, pre, delta, alphas, weights = _three_tasks(seed=1, structured=False, interpolated=interpolated)
    density_w = torch.tensor([1.0, 0.5, -0.5])
    grads = {}
    for order in ("one_at_a_time", "summed", "reversed"):
        for p in (delta, gates.logits, *alphas):
            p.grad = None
        _run_tasks(order, layout, gates, pre, delta, alphas, weights, density_w)
        grads[order] = [p.grad.clone() for p in (delta, gates.logits, *alphas)]
    base = grads["one_at_a_time"]
    assert float(base[1].abs().sum()) > 0
    for order in ("summed", "reversed"):
        torch.testing.assert_close(grads[order][0], base[0], rtol=1e-6, atol=1e-6)
        for got, want in zip(grads[order][1:], base[1:]):
            assert torch.equal(got, want), order


@pytest.mark.parametrize("order", ["one_at_a_time", "summed"])
def test_no_gate_buffer_exists_before_the_flush(order):
    """A training plan holds only its noise keys (M, 2); the one (M, G) buffer is ∇φ, made by the flush."""
    layout = GateLayout(SLOTS, structured=False)
    gates = _gates(layout)
    plan = MergePlan(layout, gates.sample(0), gates=gates, capacity=3, joint_backward=order == "summed")
    assert plan.z is None and plan.keys.shape == (M, 2) and plan.keys.dtype == torch.int32
    delta = torch.randn(1, N, requires_grad=True)
    losses = []
    for t in range(3):
        theta = merge(torch.zeros(N), delta, gates.logits, torch.full((M,), 1 / M), plan, flush=t == 2)
        losses.append(theta.pow(2).sum())
        if order == "one_at_a_time":
            losses.pop().backward()
    if losses:
        sum(losses).backward()
    assert plan.flushed and gates.logits.grad.shape == (M, N)


def _three_task_plan(joint_backward=False):
    layout = GateLayout(SLOTS, structured=False)
    gates = _gates(layout)
    plan = MergePlan(layout, gates.sample(0), gates=gates, joint_backward=joint_backward)
    delta = torch.randn(1, N, requires_grad=True)
    alpha = torch.full((M,), 1 / M)
    losses = [merge(torch.zeros(N), delta, gates.logits, alpha, plan, flush=t == 2).sum() for t in range(3)]
    return plan, gates, losses


def test_a_summed_backward_without_joint_backward_raises_instead_of_dropping_gradients():
    plan, gates, losses = _three_task_plan()
    # autograd reaches the last-created merge (the flushing task, the only one linked to φ) first
    with pytest.raises(RuntimeError, match=r"have not been backpropagated yet.*joint_backward=True"):
        sum(losses).backward()
    assert gates.logits.grad is None


def test_the_last_task_backpropagated_first_raises_without_joint_backward():
    plan, gates, losses = _three_task_plan()
    losses[0].backward()
    with pytest.raises(RuntimeError, match=r"task\(s\) \[1\] \(by merge order\) of the same gate draw have not been backpropagated"):
        losses[2].backward()


def test_a_backward_after_the_flush_raises():
    plan, gates, losses = _three_task_plan(joint_backward=True)
    losses[1].backward()
    losses[2].backward(retain_graph=True)
    losses[0].backward()  # completes the draw: ∇φ formed over z
    assert gates.logits.grad is not None and plan.flushed
    with pytest.raises(RuntimeError, match="after its step's gate gradient was formed"):
        losses[2].backward()


def test_merging_after_the_last_task_raises():
    plan, gates, losses = _three_task_plan()
    with pytest.raises(RuntimeError, match="last task .* already been merged"):
        merge(torch.zeros(N), torch.zeros(1, N), gates.logits, torch.full((M,), 1 / M), plan, flush=False)


def test_merge_is_fp32_and_unchanged_under_bf16_autocast():
    """Σ_m α_m z_m is one fp32 dot product per parameter whatever autocast region the caller is in."""
    layout = GateLayout(SLOTS, structured=True)
    gates = _gates(layout)
    pre = torch.randn(N)
    results = []
    for autocast in (False, True):
        torch.manual_seed(3)
        delta = torch.randn(1, N, requires_grad=True)
        alpha = torch.softmax(torch.randn(M), 0).requires_grad_(True)
        gates.logits.grad = None
        plan = MergePlan(layout, gates.sample(2), gates=gates)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            theta, density = merge(pre, delta, gates.logits, alpha, plan, with_density=True)
            assert theta.dtype == torch.float32 and density.dtype == torch.float32
            loss = (theta * torch.linspace(-1, 1, N)).sum() + density.sum()
        loss.backward()
        results.append([theta.detach(), delta.grad, alpha.grad, gates.logits.grad.clone()])
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32
        assert torch.equal(plain, autocast)


def test_deferred_gate_gradient_arrives_only_with_the_last_task():
    layout = GateLayout(SLOTS, structured=False)
    gates = _gates(layout)
    plan = MergePlan(layout, gates.sample(0), gates=gates)
    delta = torch.randn(1, N, requires_grad=True)
    a = torch.full((M,), 1 / M)
    merge(torch.zeros(N), delta, gates.logits, a, plan, flush=False).sum().backward()
    assert gates.logits.grad is None and plan.pending == 1
    merge(torch.zeros(N), delta, gates.logits, a, plan, flush=True).sum().backward()
    assert gates.logits.grad is not None and plan.pending == 0


def test_all_gates_zero_gives_theta_pre_exactly_and_ones_with_one_hot_alpha_gives_pre_plus_delta():
    layout = GateLayout(SLOTS, structured=False)
    pre = torch.randn(N)
    delta = torch.randn(1, N)
    zeros = MergePlan(layout, GateSample(torch.zeros(M, N), stochastic=False))
    for a in (torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 0.0, 0.0])):
        assert torch.equal(merge(pre, delta, None, a, zeros), pre)
    ones = MergePlan(layout, GateSample(torch.ones(M, N), stochastic=False))
    for m in range(M):
        onehot = torch.nn.functional.one_hot(torch.tensor(m), M).float()
        assert torch.equal(merge(pre, delta, None, onehot, ones), pre + delta[0])


def _run_selected_tasks(order, fold, layout, gates, pre, delta, hyper, inputs, weights, prior=0.1):
    """Like :func:`_run_tasks`, with each task's α = softmax(a_t) from selection logits a_t = W x_t (a
    stand-in hypernetwork with parameters ``hyper`` = W) and a prior on a_t in the task's loss; ``fold``:
    ∇α formed in the flush, α's backward into W deferred there."""
    joint = order in ("summed", "reversed")
    shared = MergePlan(layout, gates.sample(5), gates=gates, capacity=3, joint_backward=joint, fold_alpha=fold)
    losses = []
    for t, (x, w) in enumerate(zip(inputs, weights)):
        last = t == len(inputs) - 1
        plan = MergePlan(layout, GateDraw(gates.keys(5)), gates=gates, fold_alpha=fold) if order == "own_draw" else shared
        selection = hyper @ x
        alpha = torch.softmax(selection, 0)
        theta, density, selection = merge(pre, delta, gates.logits, alpha, plan, flush=last or order == "own_draw",
                                          with_density=last, selection=selection, alpha_params=[hyper])
        loss = (theta * w).sum() + prior * selection.pow(2).sum()
        if last:
            loss = loss + density.sum()
        _backpropagate(order, loss, losses, last=last)


@pytest.mark.parametrize("order", ORDERS)
def test_alpha_grad_in_the_flush_gives_each_tasks_own_gradients(order, monkeypatch):
    """With every task's ∇α formed by the flush pass (``fold_alpha``) and α's backward into its parameters
    run there, task by task: the same gradients as a ∇α pass per task in every backward order, and no ∇α
    pass runs. One task at a time they are bit-identical (the same arithmetic, summed in task order); a
    joint backward sums W's per-task shares in the engine's order without folding, in task order with it."""
    layout, gates, pre, delta, _, weights = _three_tasks(seed=2, structured=False, interpolated=True)
    hyper = torch.randn(M, 5, requires_grad=True)
    inputs = [torch.randn(5) for _ in weights]
    passes = []
    run = HardConcreteGates._run
    monkeypatch.setattr(HardConcreteGates, "_run", lambda self, name, *a, **k: passes.append(name) or run(self, name, *a, **k))
    grads = {}
    for fold in (False, True):
        for p in (delta, gates.logits, hyper):
            p.grad = None
        passes.clear()
        _run_selected_tasks(order, fold, layout, gates, pre, delta, hyper, inputs, weights)
        grads[fold] = [p.grad.clone() for p in (delta, gates.logits, hyper)]
        assert ("alpha_grad" in passes) != fold, passes
    assert float(grads[True][2].abs().sum()) > 0
    for got, want in zip(grads[True], grads[False]):
        if order in ("one_at_a_time", "own_draw"):
            assert torch.equal(got, want), order
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_deferred_alpha_needs_the_flushing_merge_to_carry_the_parameters():
    layout, gates, pre, delta, _, weights = _three_tasks(seed=2, structured=False, interpolated=True)
    hyper = torch.randn(M, 5, requires_grad=True)
    plan = MergePlan(layout, gates.sample(5), gates=gates, fold_alpha=True)
    merge(pre, delta, gates.logits, torch.softmax(hyper @ torch.randn(5), 0), plan, flush=False,
          alpha_params=[hyper]).sum().backward()
    last = merge(pre, delta, gates.logits, torch.full((M,), 1 / M), plan, flush=True)
    with pytest.raises(RuntimeError, match="no alpha_params to return their gradient through"):
        last.sum().backward()
