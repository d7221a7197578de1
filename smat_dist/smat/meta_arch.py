"""SMAT as one module: parameters, the per-task meta-training loss, and test-time merging.

Per task (the authors' meta-training step, first-order throughout):

1. θ_pre support features (no grad) -> prototypes, shared by the hypernetwork and the frozen
   pre-trained ProtoNet target (computed once).
2. α_i from the hypernetwork; θ_i = θ_pre + (Σ_m α_im z_m) ⊙ θδ (:mod:`smat_dist.smat.merge`).
3. Support features under θ_i with graph -> prototype head W. The same forward gives the inner
   support loss (against a detached copy of W): one SGD step -> θ'_i, W'; the head is re-attached
   so the outer gradient also flows through the prototypes.
4. Student query logits under θ'_i. The dense teacher's first step is the gradient of the same
   query loss w.r.t. θ'_i, taken from the student's graph (no second forward); the teacher then
   predicts the query set once (no grad).
5. Loss = (1-λ_kd)·CE + λ_kd·KD(teacher, pre-trained) + λ-terms + prior on the selection logits.

Precision: only the backbone passes run under autocast (:meth:`SMAT.autocast`, bf16 for
``precision=bf16`` or ``auto`` on CUDA); their features come back as fp32, and everything else
(hypernetwork, merge, prototypes, logits, losses, SGD steps) is fp32 (:mod:`smat_dist.smat.precision`).

Backbone passes: 6·S + 7·Q image-equivalents (a backward counted as two forwards) against ≈ 3·(S+Q)
for a ProtoNet step; the reference runs ≈ 8·(S+Q).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.episode import Episode, num_ways
from smat_dist.smat.backbone import ParamSpace, backbone_dim, build_backbone, features
from smat_dist.smat.config import ModelConfig
from smat_dist.smat.gates import GateDraw, GateLayout, GateSample, HardConcreteGates
from smat_dist.smat.hypernet import Hypernetwork
from smat_dist.smat.losses import distill
from smat_dist.smat.merge import MergePlan, merge
from smat_dist.smat.precision import backbone_autocast
from smat_dist.smat.protonet import cosine_logits, prototypes
from smat_dist.smat.timing import StepTimer


def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed for one named random stream, e.g. ("gates", seed, step)."""
    parts = [key if isinstance(key, int) else int.from_bytes(str(key).encode()[:8].ljust(8, b"\0"), "little")
             for key in keys]
    return int(np.random.SeedSequence(parts).generate_state(2, dtype=np.uint32).view(np.uint64)[0]) >> 1


def _generator(device: torch.device, *keys: int | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(*keys))
    return generator


class Constraint(NamedTuple):
    """The sparsity constraint's state for one meta-step (all (M,), constants)."""

    sparsity: torch.Tensor  # measured on this step's training gates
    violation: torch.Tensor  # sparsity - tau
    multiplier: torch.Tensor  # the λ the gate-logit penalty uses this step


@dataclass
class StepContext:
    """What the tasks of one meta-step on one worker share.

    The constraint's state (``sparsity``, ``violation``, ``multiplier``) is settled on first read:
    by then the step's first merge has counted the draw in its own pass (no separate count over the
    gates); read before any merge, it is counted on its own.
    """

    step: int
    seed: int
    plan: MergePlan
    alpha_sum: Optional[torch.Tensor] = None  # Σ_t stopgrad(α_t) over this worker's tasks so far
    tasks: int = 0
    timer: Optional[StepTimer] = None  # the meta-step's phase clock (the dense teacher's time)
    settle: Optional[Callable[[], Constraint]] = field(default=None, repr=False)  # None without gates
    _constraint: Optional[Constraint] = field(default=None, repr=False)

    def constraint(self) -> Optional[Constraint]:
        if self._constraint is None and self.settle is not None:
            self._constraint = self.settle()
        return self._constraint

    @property
    def sparsity(self) -> Optional[torch.Tensor]:
        return None if self.constraint() is None else self._constraint.sparsity

    @property
    def violation(self) -> Optional[torch.Tensor]:
        return None if self.constraint() is None else self._constraint.violation

    @property
    def multiplier(self) -> Optional[torch.Tensor]:
        return None if self.constraint() is None else self._constraint.multiplier


@dataclass
class TaskOutput:
    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


class SMAT(nn.Module):
    """θ_pre (frozen, outside the state dict), θδ, gate logits φ, hypernetwork, λ, task counter."""

    _reuse_student_graph = True  # the teacher's first step from the student's graph (tests turn it off)

    def __init__(self, cfg: ModelConfig, backbone: Optional[nn.Module] = None):
        super().__init__()
        cfg.validate()  # a ConfigError naming the key, also for configs built in code
        self.cfg = cfg
        backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        backbone.requires_grad_(False)
        # Not a registered submodule: θ_pre is not trainable state, is not all-reduced or
        # checkpointed, and exists once (the backbone's tensors are views of ``space.flat``).
        object.__setattr__(self, "backbone", backbone)
        self.space = ParamSpace(backbone, cfg.delta_include, cfg.delta_exclude)
        self.dim = backbone_dim(backbone)
        gcfg = cfg.gates
        M = gcfg.num_experts
        self.num_experts = M
        n_delta = 1 if cfg.interpolated_experts else M
        self.delta = nn.Parameter(torch.zeros(n_delta, self.space.numel))
        self.layout = GateLayout(self.space.slots, structured=gcfg.structured)
        self.gates = HardConcreteGates(self.layout, gcfg) if gcfg.enabled else None
        self.hypernet = Hypernetwork(self.dim, M, cfg.hypernet) if cfg.hypernet.enabled else None
        self.lagrange = nn.Parameter(torch.zeros(M)) if gcfg.enabled else None
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ plumbing
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.backbone._apply(fn)
        self.space.flat = fn(self.space.flat)
        params = dict(self.backbone.named_parameters())
        for slot in self.space.slots:  # keep the backbone's tensors views of the one θ_pre copy
            params[slot.name].data = self.space.flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        self.layout.to(self.delta.device)
        return self

    @property
    def theta_pre(self) -> torch.Tensor:
        return self.space.flat

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def autocast(self):
        return backbone_autocast(self.cfg.precision, self.device)

    def temperature(self, tasks_seen: Optional[int] = None) -> float:
        if self.hypernet is None:
            return float("nan")
        return self.hypernet.temperature(int(self.tasks_seen) if tasks_seen is None else tasks_seen)

    def trainable_parameters(self) -> Dict[str, list]:
        """Parameter groups, as the reference's optimisers see them."""
        groups = {"delta": [self.delta], "masks": [], "lagrange": [], "hypernet": []}
        if self.gates is not None:
            groups["masks"].append(self.gates.logits)
            groups["lagrange"].append(self.lagrange)
        if self.hypernet is not None:
            groups["hypernet"] = [param for param in self.hypernet.parameters() if param.requires_grad]
        return groups

    # ------------------------------------------------------------------ meta-step
    def begin_step(self, step: int, seed: int, *, tasks: int = 0, joint_backward: bool = False) -> StepContext:
        """Clamp φ, draw this step's gates, power-iterate; the draw's sparsity (and with it the reset of
        satisfied λ and the step's multiplier) is settled by the first merge (:class:`StepContext`).

        ``tasks`` (this worker's tasks in the step) lets the merge keep their gate-gradient
        vectors in one preallocated block. ``joint_backward`` allows any backward order of the
        step's task losses (e.g. one backward of their sum) instead of one task at a time, last
        task last (:mod:`smat_dist.smat.merge` explains the difference).
        """
        sample: Optional[GateDraw] = None
        settle = None
        if self.gates is not None:
            self.gates.clamp_()
            draw = self.gates.sample(stream_seed("gates", seed, step), measure=False)
            settle = functools.partial(self._settle_constraint, draw)
            # each task draws its own gates with noise_scope="task": the step's draw is then only measured
            sample = draw if self.cfg.gates.noise_scope == "step" else None
        if self.hypernet is not None:
            self.hypernet.power_iteration_()
        plan = MergePlan(self.layout, sample, gates=self.gates, capacity=tasks, joint_backward=joint_backward,
                         fold_alpha=self._folds_alpha)
        alpha_sum = torch.zeros(self.num_experts, device=self.device)
        return StepContext(step=step, seed=seed, plan=plan, alpha_sum=alpha_sum, settle=settle)

    def _settle_constraint(self, draw: GateDraw) -> Constraint:
        """The step's measured sparsity, its violation of τ, the reset of satisfied λ (before anything
        reads λ in this step) and the penalty's multiplier."""
        sparsity = self.gates.measure(draw)
        violation = sparsity - self.cfg.gates.target_sparsity
        if self.cfg.lagrangian.reset_when_satisfied:
            with torch.no_grad():
                self.lagrange.masked_fill_(violation > 0, 0.0)
        return Constraint(sparsity, violation, self.penalty_multiplier(violation))

    def penalty_multiplier(self, violation: torch.Tensor) -> torch.Tensor:
        """(M,) multiplier of the gate-logit penalty for a step whose sparsity misses τ by ``violation``
        (s − τ, shape (M,)): the integral λ plus the proportional part −kp·violation, floored at 0 while
        λ is projected to λ ≥ 0 (docs/algorithm.md#a-two-sided-constraint). A constant: no gradient."""
        lcfg = self.cfg.lagrangian
        multiplier = self.lagrange.detach()
        if lcfg.kp == 0:
            return multiplier  # pure dual ascent: exactly the authors' form
        multiplier = multiplier - lcfg.kp * violation.to(multiplier.dtype)
        return multiplier.clamp_min(0.0) if lcfg.project_nonneg else multiplier

    def end_step(self, tasks_in_step: int) -> None:
        """Advance the global task counter (drives the selection temperature, docs/algorithm.md#d14-temperature)."""
        self.tasks_seen += int(tasks_in_step)

    def _task_plan(self, ctx: StepContext, task_index: int) -> MergePlan:
        """The step's shared draw, or (``noise_scope="task"``) a draw of this task's own."""
        if self.gates is None or self.cfg.gates.noise_scope == "step":
            return ctx.plan
        draw = GateDraw(self.gates.keys(stream_seed("gates-task", ctx.seed, task_index)))  # its noise only
        return MergePlan(self.layout, draw, gates=self.gates, fold_alpha=self._folds_alpha)

    @property
    def _folds_alpha(self) -> bool:
        """Every task's ∇α in the flush pass (gates.alpha_grad="flush"): with a hypernetwork to defer to."""
        return self.gates is not None and self.hypernet is not None and self.cfg.gates.alpha_grad == "flush"

    def _alpha(self, proto_pre: Optional[torch.Tensor], temperature: float, *, stochastic: bool,
               generator: Optional[torch.Generator] = None):
        if self.hypernet is None:
            M = self.num_experts
            return torch.full((M,), 1.0 / M, device=self.device), None
        return self.hypernet(proto_pre, temperature, generator=generator, stochastic=stochastic)

    def _features(self, params: Optional[Dict[str, torch.Tensor]], images: torch.Tensor) -> torch.Tensor:
        """Backbone CLS features under ``params`` (None = θ_pre): the one autocast region, fp32 out."""
        with self.autocast():
            return features(self.backbone, params, images).float()

    def _logits(self, theta: torch.Tensor, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cosine ProtoNet logits of ``images`` under flat weights ``theta`` and class head ``head``."""
        return cosine_logits(self._features(self.space.views(theta), images), head, self.cfg.cosine_scale)

    @staticmethod
    def _descend(theta, head, grad_theta, grad_head, lr: float):
        """One SGD update (θ - lr·g, W - lr·g_W). The gradients are constants (first order), so a
        graph that ``theta``/``head`` carry passes through with an identity Jacobian."""
        return torch.add(theta, grad_theta, alpha=-lr), head - lr * grad_head

    def _sgd_step(self, theta, head, images, labels, lr: float):
        """One first-order SGD step on the ProtoNet CE of (images, labels), with a fresh forward at
        (θ, W); shared by the inner loop's later steps and the dense teacher."""
        theta_leaf = theta.detach().requires_grad_(True)
        head_leaf = head.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(self._logits(theta_leaf, head_leaf, images), labels)
        grad_theta, grad_head = torch.autograd.grad(loss, [theta_leaf, head_leaf])
        return self._descend(theta, head, grad_theta, grad_head, lr)

    def forward(self, episode: Episode, ctx: StepContext, task_index: int, *, last: bool) -> TaskOutput:
        """Meta-training loss of one task (not divided by anything: the caller averages).

        ``last`` marks the step's last task on this worker: its merge forms the gate gradient.
        """
        cfg = self.cfg
        teacher_cfg = cfg.teacher
        episode = episode if cfg.meta_split else episode.merged()
        ways = episode.ways
        scale = cfg.cosine_scale
        use_teacher = teacher_cfg.enabled and teacher_cfg.kd_weight > 0 and teacher_cfg.teacher_weight > 0
        use_pre_kd = teacher_cfg.kd_weight > 0 and teacher_cfg.pretrained_weight > 0
        metrics: Dict[str, torch.Tensor] = {}

        proto_pre = None
        if self.hypernet is not None or use_pre_kd:
            with torch.no_grad():
                proto_pre = prototypes(self._features(None, episode.support_x), episode.support_y, ways, check=False)
        temperature = self.temperature(task_index)
        generator = _generator(self.device, "alpha", ctx.seed, task_index) if self.hypernet is not None else None
        alpha, selection_logits = self._alpha(proto_pre, temperature, stochastic=True, generator=generator)
        plan = self._task_plan(ctx, task_index)
        flush = last or plan is not ctx.plan  # a task's own draw (noise_scope="task") flushes with it
        logits_param = self.gates.logits if self.gates is not None else None
        # the L0 term rides on the step's last merge; the selection logits pass through the merge so that,
        # with ∇α formed in the flush, the hypernetwork's backward of every task runs there (merge.merge)
        alpha_params = [p for p in self.hypernet.parameters() if p.requires_grad] if self.hypernet is not None else ()
        with_density = self.gates is not None and last
        merged = merge(self.theta_pre, self.delta, logits_param, alpha, plan, flush=flush,
                       with_density=with_density, selection=selection_logits, alpha_params=alpha_params)
        if selection_logits is not None:
            theta, density, selection_logits = merged
        else:
            theta, density = merged if with_density else (merged, None)

        # Support pass under θ_i: prototype head (with graph) and inner-loop gradient.
        support_features = self._features(self.space.views(theta), episode.support_x)
        head = prototypes(support_features, episode.support_y, ways, check=False)
        theta_q, head_q = theta, head
        if cfg.inner.steps > 0:
            theta_q, head_q, support_ce = self._inner_loop(theta, head, support_features, episode)
            metrics["support_ce"] = support_ce
        logits = cosine_logits(self._features(self.space.views(theta_q), episode.query_x), head_q, scale)
        query_ce = F.cross_entropy(logits, episode.query_y)

        kd_loss = logits.new_zeros(())
        if use_teacher:
            started = ctx.timer.mark() if ctx.timer is not None else None
            teacher_logits = self._teacher(theta, head, theta_q, head_q, query_ce, episode)
            if ctx.timer is not None:
                ctx.timer.add("teacher", started)
            kd_loss = kd_loss + teacher_cfg.teacher_weight * distill(
                logits, teacher_logits, teacher_cfg.temperature, teacher_cfg.kl_direction)
            with torch.no_grad():
                metrics["teacher_ce"] = F.cross_entropy(teacher_logits, episode.query_y)
                metrics["teacher_acc"] = (teacher_logits.argmax(-1) == episode.query_y).float().mean()
        if use_pre_kd:
            with torch.no_grad():
                pre_logits = cosine_logits(self._features(None, episode.query_x), proto_pre, scale)
            kd_loss = kd_loss + teacher_cfg.pretrained_weight * distill(
                logits, pre_logits, teacher_cfg.temperature, teacher_cfg.kl_direction)
            with torch.no_grad():
                metrics["pre_acc"] = (pre_logits.argmax(-1) == episode.query_y).float().mean()
        kd_weight = teacher_cfg.kd_weight if (use_teacher or use_pre_kd) else 0.0
        loss = (1.0 - kd_weight) * query_ce + kd_weight * kd_loss

        if selection_logits is not None and cfg.hypernet.prior_l2 > 0:
            loss = loss + cfg.hypernet.prior_l2 * selection_logits.pow(2).mean()
        if self.gates is not None:
            alpha_value = alpha.detach().float()
            ctx.alpha_sum += alpha_value
            # Only λ gets gradient: descending it raises λ_m while expert m is too dense. The authors weight
            # it by α (docs/algorithm.md#d10-lagrange-multiplier); dual ascent moves λ_m with τ − s_m alone.
            reference = cfg.lagrangian.update == "reference"
            if reference:
                lagrangian_term = (ctx.violation * self.lagrange * alpha_value).sum()
            else:
                lagrangian_term = (ctx.violation * self.lagrange).sum()
            loss = loss + lagrangian_term
            metrics["lagrangian_term"] = lagrangian_term.detach()
            if density is not None:  # the L0 term depends on the step's tasks only through Σ_t α_t
                target_density = 1.0 - cfg.gates.target_sparsity
                # usage weight: Σ_t α_t (the authors'), or relative to uniform use, M·Σ_t α_t (dual)
                usage = ctx.alpha_sum if reference else ctx.alpha_sum * self.num_experts
                sparsity_penalty = (ctx.multiplier * usage * (density - target_density)).sum()
                loss = loss + sparsity_penalty
                metrics["sparsity_penalty"] = sparsity_penalty.detach()
        ctx.tasks += 1
        with torch.no_grad():
            metrics.update(
                query_ce=query_ce.detach(),
                kd=kd_loss.detach(),
                loss=loss.detach(),
                query_acc=(logits.argmax(-1) == episode.query_y).float().mean(),
                ways=torch.tensor(float(ways)),
                alpha_entropy=-(alpha.clamp_min(1e-12) * alpha.clamp_min(1e-12).log()).sum().detach(),
            )
            metrics["alpha"] = alpha.detach()
        return TaskOutput(loss=loss, metrics=metrics)

    def _inner_loop(self, theta, head, support_features, episode: Episode):
        """First-order SGD on the support CE; the first step reuses the support forward."""
        lr = self.cfg.inner.lr
        head_leaf = head.detach().requires_grad_(True)
        support_ce = F.cross_entropy(cosine_logits(support_features, head_leaf, self.cfg.cosine_scale), episode.support_y)
        grad_theta, grad_head = torch.autograd.grad(support_ce, [theta, head_leaf], retain_graph=True)
        theta_q, head_value = self._descend(theta, head_leaf.detach(), grad_theta, grad_head, lr)
        del grad_theta  # |θ|-sized: free before the query pass
        for _ in range(self.cfg.inner.steps - 1):
            theta_q, head_value = self._sgd_step(theta_q, head_value, episode.support_x, episode.support_y, lr)
        # Value W', gradient into the prototype computation (the reference's re-attach trick).
        head_q = head_value + head - head.detach()
        return theta_q, head_q, support_ce.detach()

    def _teacher(self, theta, head, theta_q, head_q, query_ce, episode: Episode):
        """Dense teacher: K SGD steps from θ'_i (or θ_i), then its query logits (no grad)."""
        teacher_cfg = self.cfg.teacher
        start_adapted = teacher_cfg.start == "adapted"
        remaining = teacher_cfg.steps
        if start_adapted and teacher_cfg.data == "query" and teacher_cfg.steps >= 1 and self._reuse_student_graph:
            grad_theta, grad_head = torch.autograd.grad(query_ce, [theta_q, head_q], retain_graph=True)
            theta_t, head_t = self._descend(theta_q.detach(), head_q.detach(), grad_theta, grad_head, teacher_cfg.lr)
            del grad_theta
            remaining -= 1
        else:
            theta_t = (theta_q if start_adapted else theta).detach()
            head_t = (head_q if start_adapted else head).detach()
        if teacher_cfg.data == "query":
            images, labels = episode.query_x, episode.query_y
        else:
            images, labels = torch.cat([episode.support_x, episode.query_x]), torch.cat([episode.support_y, episode.query_y])
        for _ in range(remaining):
            theta_t, head_t = self._sgd_step(theta_t.detach(), head_t.detach(), images, labels, teacher_cfg.lr)
        with torch.no_grad():
            return self._logits(theta_t, head_t, episode.query_x)

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def step_metrics(self, ctx: StepContext, *, diagnostics: bool = True) -> Dict[str, torch.Tensor]:
        """The step's global state for the log. ``diagnostics=False`` (steps whose metrics are not
        written) skips what costs a pass over the (M, G) gate logits: the test-gate sparsity."""
        out: Dict[str, torch.Tensor] = {}
        if self.hypernet is not None:
            out["temperature"] = torch.tensor(self.temperature())
        if self.gates is not None:
            out["sparsity"] = ctx.sparsity
            if diagnostics:
                out["sparsity_test"] = self.gates.test_sparsity()
            out["lambda"] = self.lagrange.detach().clone()
            density = ctx.plan.density
            out["expected_density"] = density if density is not None else self.gates.density_value()
        return out

    # ------------------------------------------------------------------ test time
    # At test time a task's weights are the deterministic merge itself: no inner step (that only
    # shapes training), gates at their deterministic values, α from the hypernetwork's sigmoid
    # without noise. Evaluation (smat_dist.eval) calls these methods; they are the one definition.

    @torch.no_grad()
    def test_gates(self) -> Optional[torch.Tensor]:
        """Deterministic gates z (M, G) of the test-time merge; None without expert masks.

        Not cached here (an (M, G) tensor is 0.69 GB for ViT-S, M=8): a caller merging many tasks
        with fixed parameters computes them once and passes them to :meth:`merged_weights`.
        """
        return None if self.gates is None else self.gates.deterministic()

    @torch.no_grad()
    def task_alpha(self, support_x: Optional[torch.Tensor] = None, support_y: Optional[torch.Tensor] = None,
                   *, proto_pre: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Test-time expert weights α_i (M,): deterministic, at the current selection temperature;
        uniform 1/M without a hypernetwork (then no support set is needed).

        ``proto_pre``: the task's class prototypes under θ_pre when the caller already has them
        (evaluation caches θ_pre features); otherwise they come from ``support_x``/``support_y``.
        Always fp32 (the hypernetwork and prototypes run under :func:`full_precision`).
        """
        if self.hypernet is not None and proto_pre is None:
            if support_x is None or support_y is None:
                raise ValueError("task_alpha needs the support set or its θ_pre prototypes (proto_pre)")
            proto_pre = prototypes(self._features(None, support_x), support_y, num_ways(support_y))
        alpha, _ = self._alpha(None if proto_pre is None else proto_pre.float(), self.temperature(), stochastic=False)
        return alpha.detach().float()

    @torch.no_grad()
    def merged_weights(self, alpha: torch.Tensor, *, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """θ_i = θ_pre + (Σ_m α_m z_m) ⊙ θδ (flat) with the deterministic gates.

        ``gates``: :meth:`test_gates`, when the caller reuses them across tasks.
        """
        sample = None
        if self.gates is not None:
            sample = GateSample(z=self.test_gates() if gates is None else gates, stochastic=False)
        return merge(self.theta_pre, self.delta, None, alpha.to(self.delta.dtype), MergePlan(self.layout, sample),
                     flush=True)

    @torch.no_grad()
    def task_weights(self, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """Deterministic merged weights θ_i (flat) of a task, as at meta-test."""
        return self.merged_weights(self.task_alpha(support_x, support_y))

    @torch.no_grad()
    def predict(self, support_x, support_y, query_x, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ProtoNet logits of the query set under the task's merged weights."""
        theta = self.task_weights(support_x, support_y) if theta is None else theta
        head = prototypes(self._features(self.space.views(theta), support_x), support_y, num_ways(support_y))
        return self._logits(theta, head, query_x)

    def backbone_state(self, theta: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """A full backbone state dict with the gated tensors taken from ``theta`` (default θ_pre)."""
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        if theta is not None:
            for name, t in self.space.views(theta.detach()).items():
                state[name] = t.clone()
        return state
