"""SMAT as one module: parameters, the per-task meta-training loss, and test-time merging.

Per task (reference §7.8, first-order throughout):

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

Backbone passes: 6·S + 7·Q image-equivalents (a backward counted as two forwards) against ≈ 3·(S+Q)
for a ProtoNet step; the reference runs ≈ 8·(S+Q).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.episode import Episode
from smat_dist.smat.backbone import ParamSpace, backbone_dim, build_backbone, features
from smat_dist.smat.config import ModelConfig
from smat_dist.smat.gates import GateLayout, GateSample, HardConcreteGates
from smat_dist.smat.hypernet import Hypernetwork
from smat_dist.smat.losses import distill
from smat_dist.smat.merge import MergePlan, merge
from smat_dist.smat.protonet import cosine_logits, prototypes


def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed for one named random stream, e.g. ("gates", seed, step)."""
    ints = [k if isinstance(k, int) else int.from_bytes(str(k).encode()[:8].ljust(8, b"\0"), "little") for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).view(np.uint64)[0]) >> 1


def _generator(device: torch.device, *keys: int | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*keys))
    return g


@dataclass
class StepContext:
    """What the tasks of one meta-step on one worker share."""

    step: int
    seed: int
    plan: MergePlan
    sparsity: Optional[torch.Tensor] = None  # (M,) measured on this step's training gates
    violation: Optional[torch.Tensor] = None  # sparsity - tau
    alpha_sum: Optional[torch.Tensor] = None  # Σ_t stopgrad(α_t) over this worker's tasks so far
    tasks: int = 0


@dataclass
class TaskOutput:
    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


class SMAT(nn.Module):
    """θ_pre (frozen, outside the state dict), θδ, gate logits φ, hypernetwork, λ, task counter."""

    _reuse_student_graph = True  # the teacher's first step from the student's graph (tests turn it off)

    def __init__(self, cfg: ModelConfig, backbone: Optional[nn.Module] = None):
        super().__init__()
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
        if M < 1:
            raise ValueError("gates.num_experts must be >= 1")
        self.num_experts = M
        n_delta = 1 if cfg.interpolated_experts else M
        self.delta = nn.Parameter(torch.zeros(n_delta, self.space.numel))
        self.layout = GateLayout(self.space.slots, gcfg.structured)
        self.gates = HardConcreteGates(self.layout, gcfg) if gcfg.enabled else None
        self.hypernet = Hypernetwork(self.dim, M, cfg.hypernet) if cfg.hypernet.enabled else None
        self.lagrange = nn.Parameter(torch.zeros(M)) if gcfg.enabled else None
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.int64))
        self._check()

    def _check(self) -> None:
        c = self.cfg
        if c.teacher.start not in ("adapted", "merged"):
            raise ValueError(f"teacher.start must be adapted or merged, got {c.teacher.start!r}")
        if c.teacher.data not in ("query", "support_query"):
            raise ValueError(f"teacher.data must be query or support_query, got {c.teacher.data!r}")
        if c.gates.noise_scope not in ("step", "task"):
            raise ValueError(f"gates.noise_scope must be step or task, got {c.gates.noise_scope!r}")
        if not 0.0 <= c.gates.target_sparsity < 1.0:
            raise ValueError("gates.target_sparsity must be in [0, 1)")
        if c.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {c.precision!r}")

    # ------------------------------------------------------------------ plumbing
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.backbone._apply(fn)
        self.space.flat = fn(self.space.flat)
        params = dict(self.backbone.named_parameters())
        for s in self.space.slots:  # keep the backbone's tensors views of the one θ_pre copy
            params[s.name].data = self.space.flat[s.offset : s.offset + s.numel].view(s.shape)
        self.layout.to(self.delta.device)
        return self

    @property
    def theta_pre(self) -> torch.Tensor:
        return self.space.flat

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def autocast(self):
        dev = self.device
        use_bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and dev.type == "cuda")
        if use_bf16:
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def temperature(self, tasks_seen: Optional[int] = None) -> float:
        if self.hypernet is None:
            return float("nan")
        n = int(self.tasks_seen) if tasks_seen is None else tasks_seen
        return self.hypernet.temperature(n)

    def trainable_parameters(self) -> Dict[str, list]:
        """Parameter groups, as the reference's optimisers see them."""
        groups = {"delta": [self.delta], "masks": [], "lagrange": [], "hypernet": []}
        if self.gates is not None:
            groups["masks"].append(self.gates.logits)
            groups["lagrange"].append(self.lagrange)
        if self.hypernet is not None:
            groups["hypernet"] = [p for p in self.hypernet.parameters() if p.requires_grad]
        return groups

    # ------------------------------------------------------------------ meta-step
    def begin_step(self, step: int, seed: int, tasks: int = 0) -> StepContext:
        """Clamp φ, draw this step's gates, measure sparsity, reset satisfied λ, power-iterate.

        ``tasks`` (this worker's tasks in the step) lets the merge keep their gate-gradient
        vectors in one preallocated block.
        """
        sample: Optional[GateSample] = None
        sparsity = violation = None
        if self.gates is not None:
            self.gates.clamp_()
            sample = self.gates.sample(stream_seed("gates", seed, step))
            sparsity = sample.sparsity
            violation = sparsity - self.cfg.gates.target_sparsity
            if self.cfg.lagrangian.reset_when_satisfied:
                with torch.no_grad():
                    self.lagrange.masked_fill_(violation > 0, 0.0)
            if self.cfg.gates.noise_scope == "task":
                sample = None  # each task draws its own gates
        if self.hypernet is not None:
            self.hypernet.power_iteration_()
        plan = MergePlan(self.layout, sample, self.gates, defer=True, capacity=tasks)
        alpha_sum = torch.zeros(self.num_experts, device=self.device)
        return StepContext(step=step, seed=seed, plan=plan, sparsity=sparsity, violation=violation, alpha_sum=alpha_sum)

    def end_step(self, tasks_in_step: int) -> None:
        """Advance the global task counter (drives the selection temperature, D14)."""
        self.tasks_seen += int(tasks_in_step)

    def _task_plan(self, ctx: StepContext, task_index: int) -> MergePlan:
        if self.gates is None or self.cfg.gates.noise_scope == "step":
            return ctx.plan
        sample = self.gates.sample(stream_seed("gates-task", ctx.seed, task_index))
        return MergePlan(self.layout, sample, self.gates, defer=False)

    def _alpha(self, proto_pre: Optional[torch.Tensor], temperature: float, stochastic: bool, gen=None):
        if self.hypernet is None:
            M = self.num_experts
            return torch.full((M,), 1.0 / M, device=self.device), None
        return self.hypernet(proto_pre, temperature, generator=gen, stochastic=stochastic)

    def forward(self, episode: Episode, ctx: StepContext, task_index: int, last: bool) -> TaskOutput:
        """Meta-training loss of one task (already divided by nothing: the caller averages)."""
        cfg = self.cfg
        tc = cfg.teacher
        ep = episode if cfg.meta_split else episode.merged()
        xs, ys, xq, yq = ep.support_x, ep.support_y, ep.query_x, ep.query_y
        ways = int(ys.max()) + 1
        scale = cfg.cosine_scale
        use_teacher = tc.enabled and tc.kd_weight > 0 and tc.teacher_weight > 0
        use_pre_kd = tc.kd_weight > 0 and tc.pretrained_weight > 0
        metrics: Dict[str, torch.Tensor] = {}

        with self.autocast():
            proto_pre = None
            if self.hypernet is not None or use_pre_kd:
                with torch.no_grad():
                    proto_pre = prototypes(features(self.backbone, None, xs).float(), ys, ways)
            temperature = self.temperature(task_index)
            gen = _generator(self.device, "alpha", ctx.seed, task_index) if self.hypernet is not None else None
            alpha, sel_logits = self._alpha(proto_pre, temperature, stochastic=True, gen=gen)
            logits_param = self.gates.logits if self.gates is not None else None
            density = None
            if self.gates is not None and last:  # the L0 term rides on the step's last merge
                theta, density = merge(self.theta_pre, self.delta, logits_param, alpha,
                                       self._task_plan(ctx, task_index), True, with_density=True)
            else:
                theta = merge(self.theta_pre, self.delta, logits_param, alpha, self._task_plan(ctx, task_index), last)

            # Support pass under θ_i: prototype head (with graph) and inner-loop gradient.
            f_s = features(self.backbone, self.space.views(theta), xs)
            head = prototypes(f_s.float(), ys, ways)
            theta_q, head_q = theta, head
            if cfg.inner.steps > 0:
                theta_q, head_q, support_ce = self._inner_loop(theta, head, f_s, xs, ys, scale)
                metrics["support_ce"] = support_ce
            f_q = features(self.backbone, self.space.views(theta_q), xq)
            logits = cosine_logits(f_q, head_q, scale)
            ce = F.cross_entropy(logits, yq)

            kd = logits.new_zeros(())
            if use_teacher:
                t0 = self._clock()
                t_logits = self._teacher(theta, head, theta_q, head_q, ce, ep, scale)
                metrics["time_teacher"] = torch.tensor(self._clock() - t0)
                kd = kd + tc.teacher_weight * distill(logits, t_logits, tc.temperature, tc.kl_direction)
                with torch.no_grad():
                    metrics["teacher_ce"] = F.cross_entropy(t_logits, yq)
                    metrics["teacher_acc"] = (t_logits.argmax(-1) == yq).float().mean()
            if use_pre_kd:
                with torch.no_grad():
                    p_logits = cosine_logits(features(self.backbone, None, xq).float(), proto_pre, scale)
                kd = kd + tc.pretrained_weight * distill(logits, p_logits, tc.temperature, tc.kl_direction)
                with torch.no_grad():
                    metrics["pre_acc"] = (p_logits.argmax(-1) == yq).float().mean()
        lam = tc.kd_weight if (use_teacher or use_pre_kd) else 0.0
        loss = (1.0 - lam) * ce + lam * kd

        if sel_logits is not None and cfg.hypernet.prior_l2 > 0:
            loss = loss + cfg.hypernet.prior_l2 * sel_logits.pow(2).mean()
        if self.gates is not None:
            a_bar = alpha.detach().float()
            ctx.alpha_sum += a_bar
            # Only λ gets gradient: descending it raises λ_m while expert m is too dense.
            lagr = (ctx.violation * self.lagrange * a_bar).sum()
            loss = loss + lagr
            metrics["lagrangian_term"] = lagr.detach()
            if density is not None:  # the L0 term depends on the step's tasks only through Σ_t α_t
                target_density = 1.0 - cfg.gates.target_sparsity
                l_sp = (self.lagrange.detach() * ctx.alpha_sum * (density - target_density)).sum()
                loss = loss + l_sp
                metrics["sparsity_penalty"] = l_sp.detach()
        ctx.tasks += 1
        with torch.no_grad():
            metrics.update(
                query_ce=ce.detach(),
                kd=kd.detach(),
                loss=loss.detach(),
                query_acc=(logits.argmax(-1) == yq).float().mean(),
                ways=torch.tensor(float(ways)),
                alpha_entropy=-(alpha.clamp_min(1e-12) * alpha.clamp_min(1e-12).log()).sum().detach(),
            )
            metrics["alpha"] = alpha.detach()
        return TaskOutput(loss=loss, metrics=metrics)

    def _inner_loop(self, theta, head, f_s, xs, ys, scale):
        """First-order SGD on the support CE; the first step reuses the support forward."""
        lr = self.cfg.inner.lr
        head_leaf = head.detach().requires_grad_(True)
        support_ce = F.cross_entropy(cosine_logits(f_s, head_leaf, scale), ys)
        g_theta, g_head = torch.autograd.grad(support_ce, [theta, head_leaf], retain_graph=True)
        theta_q = torch.add(theta, g_theta, alpha=-lr)  # g is a constant: first order
        head_val = head_leaf.detach() - lr * g_head
        del g_theta  # |θ|-sized: free before the query pass
        for _ in range(self.cfg.inner.steps - 1):
            th = theta_q.detach().requires_grad_(True)
            hd = head_val.detach().requires_grad_(True)
            with torch.enable_grad():
                loss_k = F.cross_entropy(cosine_logits(features(self.backbone, self.space.views(th), xs), hd, scale), ys)
            g_theta, g_head = torch.autograd.grad(loss_k, [th, hd])
            theta_q = theta_q - lr * g_theta
            head_val = head_val - lr * g_head
        # Value W', gradient into the prototype computation (the reference's re-attach trick).
        head_q = head_val + head - head.detach()
        return theta_q, head_q, support_ce.detach()

    def _teacher(self, theta, head, theta_q, head_q, ce_q, ep: Episode, scale):
        """Dense teacher: K SGD steps from θ'_i (or θ_i), then its query logits (no grad)."""
        tc = self.cfg.teacher
        start_adapted = tc.start == "adapted"
        remaining = tc.steps
        if start_adapted and tc.data == "query" and tc.steps >= 1 and self._reuse_student_graph:
            g_theta, g_head = torch.autograd.grad(ce_q, [theta_q, head_q], retain_graph=True)
            th = torch.add(theta_q.detach(), g_theta, alpha=-tc.lr)
            hd = head_q.detach() - tc.lr * g_head
            del g_theta
            remaining -= 1
        else:
            th = (theta_q if start_adapted else theta).detach()
            hd = (head_q if start_adapted else head).detach()
        if tc.data == "query":
            x, y = ep.query_x, ep.query_y
        else:
            x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
        for _ in range(remaining):
            th = th.detach().requires_grad_(True)
            hd = hd.detach().requires_grad_(True)
            with torch.enable_grad():
                loss_t = F.cross_entropy(cosine_logits(features(self.backbone, self.space.views(th), x), hd, scale), y)
            g_theta, g_head = torch.autograd.grad(loss_t, [th, hd])
            th = torch.add(th.detach(), g_theta, alpha=-tc.lr)
            hd = hd.detach() - tc.lr * g_head
        with torch.no_grad():
            return cosine_logits(features(self.backbone, self.space.views(th), ep.query_x), hd, scale)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def step_metrics(self, ctx: StepContext) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        if self.hypernet is not None:
            out["temperature"] = torch.tensor(self.temperature())
        if self.gates is not None:
            out["sparsity"] = ctx.sparsity
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
        Runs under the caller's autocast.
        """
        if self.hypernet is not None and proto_pre is None:
            if support_x is None or support_y is None:
                raise ValueError("task_alpha needs the support set or its θ_pre prototypes (proto_pre)")
            ways = int(support_y.max()) + 1
            proto_pre = prototypes(features(self.backbone, None, support_x).float(), support_y, ways)
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
        return merge(self.theta_pre, self.delta, None, alpha.to(self.delta.dtype), MergePlan(self.layout, sample), True)

    @torch.no_grad()
    def task_weights(self, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """Deterministic merged weights θ_i (flat) of a task, as at meta-test."""
        with self.autocast():
            alpha = self.task_alpha(support_x, support_y)
        return self.merged_weights(alpha)

    @torch.no_grad()
    def predict(self, support_x, support_y, query_x, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ProtoNet logits of the query set under the task's merged weights."""
        theta = self.task_weights(support_x, support_y) if theta is None else theta
        params = self.space.views(theta)
        ways = int(support_y.max()) + 1
        with self.autocast():
            head = prototypes(features(self.backbone, params, support_x).float(), support_y, ways)
            return cosine_logits(features(self.backbone, params, query_x), head, self.cfg.cosine_scale)

    def backbone_state(self, theta: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """A full backbone state dict with the gated tensors taken from ``theta`` (default θ_pre)."""
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        if theta is not None:
            for name, t in self.space.views(theta.detach()).items():
                state[name] = t.clone()
        return state
