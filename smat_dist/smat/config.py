"""Typed defaults of the SMAT algorithm (the single source of every constant).

Each field's default is what the authors' released code does, unless the field's comment cites a
divergence (an anchor of docs/algorithm.md, where each is explained) and says why we chose otherwise. The
YAML files under ``configs/`` only hold what differs from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from smat_dist.errors import require


def _positive(section: object, key: str, names: tuple) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, f"{key}.{name}", "> 0", value)


def _non_negative(section: object, key: str, names: tuple) -> None:
    for name in names:
        value = getattr(section, name)
        require(value >= 0, f"{key}.{name}", ">= 0", value)


def _one_of(section: object, key: str, name: str, choices: tuple) -> None:
    value = getattr(section, name)
    require(value in choices, f"{key}.{name}", "one of " + ", ".join(choices), value)


@dataclass
class BackboneConfig:
    """Any timm ViT. ``overrides`` go to ``timm.create_model`` (``embed_dim``, ``depth``...)."""

    name: str = "vit_small_patch16_224"
    img_size: int = 128  # meta-training resolution; timm resamples the position embedding
    patch_size: Optional[int] = None  # None keeps the model's own
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    # Pre-trained weights: a timm tag such as "vit_small_patch16_224.dino" (needs the hub),
    # or a local file (DINO .pth, timm .safetensors, or a smat-dist pre-training export).
    pretrained: bool = False
    checkpoint: Optional[str] = None
    fused_attn: bool = True  # all our gradients are first-order, so fused attention is safe


    def validate(self, key: str = "model.backbone") -> None:
        require(self.img_size >= 8, f"{key}.img_size", ">= 8", self.img_size)
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{key}.{name}", ">= 1 or null", value)


@dataclass
class GateConfig:
    """Hard-concrete (L0) gates: one logit per parameter (or group) per expert."""

    enabled: bool = True  # Table 2 "MLS": meta-learned sparsity. False => masks are all ones
    num_experts: int = 8
    target_sparsity: float = 0.9  # tau: minimum fraction of exactly-zero gates per expert
    structured: bool = False  # per input column of 2-D weights, per output channel of conv
    beta: float = 2.0 / 3.0
    zeta: float = 1.1
    gamma: float = -0.1
    eps: float = 1e-6
    # docs/algorithm.md#d15-logit-init: the authors' init_dropout_rate argument is dead code
    logit_init_mean: float = 0.0
    logit_init_std: float = 0.5
    logit_clip: float = 4.605170185988091  # ln(100): logits are clamped to +-clip every step
    # docs/algorithm.md#d1-gate-noise: the authors' code draws u ~ U(0.5-eps, 0.5+eps), i.e. no noise. We use real
    # hard-concrete noise u ~ U(eps, 1-eps) (the paper's L0 relaxation); "reference" reproduces
    # the authors' deterministic training gates.
    noise: str = "hard_concrete"  # hard_concrete | reference
    # One noise draw per meta-step shared by its tasks (as Louizos et al. share one mask per
    # minibatch) makes the gates identical on every rank and lets the gate-logit gradient be
    # formed once per step; "task" draws per task.
    noise_scope: str = "step"  # step | task
    test_beta: float = 1.0  # deterministic test gate z = clamp(sigmoid(phi/test_beta)*(zeta-gamma)+gamma)
    # How the passes over the (M, G) gates run (smat_dist.smat.gates): "compiled" = one torch.compile
    # kernel per pass (a fixed number of launches whatever |theta|), "eager" = column chunks sized for
    # the device, "auto" = compiled from 2^22 gates on (falls back to eager if compiling fails).
    kernel: str = "auto"  # auto | compiled | eager
    # Where ∇α (<z_m, θδ⊙G_t> per task) is formed: "flush" = every task's inside the step's one flush pass
    # (the hypernetwork's backward of each task waits for it; same numbers, docs/algorithm.md#backward-order),
    # "task" = a pass of its own in each task's backward.
    alpha_grad: str = "flush"  # flush | task


    def validate(self, key: str = "model.gates") -> None:
        require(self.num_experts >= 1, f"{key}.num_experts", ">= 1", self.num_experts)
        require(0.0 <= self.target_sparsity < 1.0, f"{key}.target_sparsity", "in [0, 1)", self.target_sparsity)
        _positive(self, key, ("beta", "logit_clip", "test_beta"))
        _non_negative(self, key, ("logit_init_std",))
        # the stretched interval (gamma, zeta) must hold [0, 1] for gates to reach exactly 0 and 1
        require(self.gamma < 0.0, f"{key}.gamma", "< 0", self.gamma)
        require(self.zeta > 1.0, f"{key}.zeta", "> 1", self.zeta)
        require(0.0 < self.eps < 0.5, f"{key}.eps", "in (0, 0.5)", self.eps)
        _one_of(self, key, "noise", ("hard_concrete", "reference"))
        _one_of(self, key, "noise_scope", ("step", "task"))
        _one_of(self, key, "alpha_grad", ("flush", "task"))


@dataclass
class HypernetConfig:
    enabled: bool = True
    num_tokens: int = 4  # learnable "skill" tokens appended to the prototypes
    num_heads: int = 4
    mlp_ratio: float = 2.0
    token_init_std: float = 1e-3
    spectral_norm: bool = True
    # docs/algorithm.md#d3-task-embedding: the authors take the block output at class 0's prototype.
    pool: str = "class0"  # class0 | mean | tokens
    temperature_start: float = 5.0
    temperature_min: float = 0.5
    # T = max(min, start - n / decay), n = tasks seen by the whole run (docs/algorithm.md#d14-temperature)
    temperature_decay_tasks: float = 4000.0
    prior_l2: float = 1e-4  # weight of mean(logits^2)


    def validate(self, key: str = "model.hypernet") -> None:
        _one_of(self, key, "pool", ("class0", "mean", "tokens"))
        least = 1 if self.pool == "tokens" else 0  # pool=tokens averages the tokens' outputs
        require(self.num_tokens >= least, f"{key}.num_tokens", f">= {least}", self.num_tokens)
        _positive(self, key, ("num_heads", "mlp_ratio", "temperature_start", "temperature_min",
                              "temperature_decay_tasks"))
        _non_negative(self, key, ("token_init_std", "prior_l2"))


@dataclass
class InnerConfig:
    steps: int = 1  # first-order SGD steps on the support set; 0 = plain ProtoNet (PMF)
    lr: float = 1e-3


    def validate(self, key: str = "model.inner") -> None:
        _non_negative(self, key, ("steps", "lr"))


@dataclass
class TeacherConfig:
    enabled: bool = True  # Table 2 "DT"
    steps: int = 1  # the authors hard-code 1 (docs/algorithm.md#d4-teacher)
    lr: float = 5e-3
    start: str = "adapted"  # adapted (theta'_i, reference) | merged (theta_i, paper figure)
    data: str = "query"  # query (reference) | support_query
    kd_weight: float = 0.25  # lambda_kd: L = (1-lambda_kd) CE + lambda_kd KD
    teacher_weight: float = 0.5  # share of the dense-teacher target inside KD
    # share of the frozen pre-trained ProtoNet target (docs/algorithm.md#d5-distillation)
    pretrained_weight: float = 0.5
    temperature: float = 2.0
    # docs/algorithm.md#d5-distillation: the authors compute KL(student || teacher) ("reverse"); we keep it
    # because it is what produced the published numbers. "forward" is Hinton's KL(teacher || student).
    kl_direction: str = "reverse"


    def validate(self, key: str = "model.teacher") -> None:
        _non_negative(self, key, ("steps", "lr", "teacher_weight", "pretrained_weight"))
        require(0.0 <= self.kd_weight <= 1.0, f"{key}.kd_weight", "in [0, 1]", self.kd_weight)
        _positive(self, key, ("temperature",))
        _one_of(self, key, "start", ("adapted", "merged"))
        _one_of(self, key, "data", ("query", "support_query"))
        _one_of(self, key, "kl_direction", ("reverse", "forward"))


@dataclass
class LagrangianConfig:
    lr: float = 2e-3
    # docs/algorithm.md#d10-lagrange-multiplier: "dual" = per-expert dual ascent, λ_m += lr·(τ − s_m), with the
    # relative usage M·ᾱ_m only in the gate-logit penalty, so the push on each expert does not shrink with M;
    # "reference" = the authors' update, λ_m += lr·(τ − s_m)·ᾱ_m and penalty weight ᾱ_m (a push ∝ lr/M²).
    update: str = "dual"  # dual | reference
    # The authors only zero lambda when the expert is sparser than tau; we also project
    # lambda to >= 0 after each step so it is a proper multiplier.
    project_nonneg: bool = True
    reset_when_satisfied: bool = True
    # docs/algorithm.md#a-two-sided-constraint: proportional gain of a PI multiplier. The gate-logit penalty
    # uses λ_m + kp·(τ − s_m) (floored at 0 while project_nonneg), λ_m staying the integral; the proportional
    # part damps the equality constraint (project_nonneg and reset_when_satisfied off), which pure dual
    # ascent drives into oscillation. 0 = pure dual ascent (the authors').
    kp: float = 0.0

    def validate(self, key: str = "model.lagrangian") -> None:
        _non_negative(self, key, ("lr", "kp"))
        _one_of(self, key, "update", ("dual", "reference"))


@dataclass
class OptimConfig:
    delta_lr: float = 1e-4
    delta_momentum: float = 0.9
    delta_weight_decay: float = 1e-4  # coupled L2 on theta_delta (pulls towards theta_pre)
    mask_lr: float = 1e6  # compensates the 1/|theta| of the L0 term (docs/algorithm.md#d12-mask-lr)
    hypernet_lr: float = 1e-4
    hypernet_weight_decay: float = 1e-2
    hypernet_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # Per-group gradient-norm clipping; null = none (docs/algorithm.md#d13-clipping: θδ and λ are not clipped).
    delta_clip: Optional[float] = None
    mask_clip: Optional[float] = 5.0
    hypernet_clip: Optional[float] = 1.0
    # Schedule: the authors' cosine-with-warmup multiplier, stepped once per epoch
    # (docs/algorithm.md#d7-first-epoch-lr).
    warmup_epochs: int = 5
    total_epochs: int = 50
    # The authors set every SGD group to an absolute 1e-6 in epoch 0; null = off.
    first_epoch_abs_lr: Optional[float] = None
    # docs/algorithm.md#d10-lagrange-multiplier: after warm-up the λ and gate-logit groups never go below this
    # fraction of their base lr, so the cosine cannot switch the constraint off before τ is reached;
    # 0 = the authors' (every group follows the cosine to ≈ 0).
    constraint_lr_floor: float = 0.5

    def validate(self, key: str = "model.optim") -> None:
        _non_negative(self, key, ("delta_lr", "delta_weight_decay", "mask_lr", "hypernet_lr", "hypernet_weight_decay",
                                  "warmup_epochs"))
        require(0.0 <= self.delta_momentum < 1.0, f"{key}.delta_momentum", "in [0, 1)", self.delta_momentum)
        betas = list(self.hypernet_betas)
        require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"{key}.hypernet_betas",
                "two values in [0, 1)", betas)
        for name in ("delta_clip", "mask_clip", "hypernet_clip"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{key}.{name}", "> 0 or null", value)
        require(self.total_epochs >= 1, f"{key}.total_epochs", ">= 1", self.total_epochs)
        require(self.first_epoch_abs_lr is None or self.first_epoch_abs_lr >= 0, f"{key}.first_epoch_abs_lr",
                ">= 0 or null", self.first_epoch_abs_lr)
        require(0.0 <= self.constraint_lr_floor <= 1.0, f"{key}.constraint_lr_floor", "in [0, 1]",
                self.constraint_lr_floor)


@dataclass
class ModelConfig:
    """Which method this is. The baselines are settings of the same code (see README)."""

    method: str = "smat"  # free-form label written into results (smat, pmf, softmerge, ...)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lagrangian: LagrangianConfig = field(default_factory=LagrangianConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Table 2 "IE": True = experts z_m * theta_delta share one dense offset (SMAT);
    # False = every expert owns its offset theta_delta_m (M times the memory).
    interpolated_experts: bool = True
    # Table 2 "Meta": False = no support/query split; every task trains on support+query as one set.
    meta_split: bool = True
    # Which backbone tensors get an offset (fnmatch patterns on parameter names).
    delta_include: List[str] = field(default_factory=lambda: ["*"])
    delta_exclude: List[str] = field(default_factory=list)
    cosine_scale: float = 10.0
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16. bf16 covers the backbone only: the merge, gates,
    # hypernetwork, prototypes and losses always run in fp32 (smat_dist.smat.precision).
    precision: str = "auto"

    def validate(self, key: str = "model") -> None:
        """Every subsection's checks; a bad value is one :class:`~smat_dist.errors.ConfigError` naming its key."""
        for name in ("backbone", "gates", "hypernet", "inner", "teacher", "lagrangian", "optim"):
            getattr(self, name).validate(f"{key}.{name}")
        _one_of(self, key, "precision", ("auto", "fp32", "bf16"))
        _positive(self, key, ("cosine_scale",))
