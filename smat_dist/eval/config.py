"""Typed settings of meta-testing (``smat-eval``): defaults ⊕ optional YAML ⊕ ``key=value`` dotlist.

Defaults follow the Meta-Dataset test protocol the SMAT paper reports: 600 frozen episodes per
source, ProtoNet on the deterministic merge, and for ``full``/``lora`` the published SMAT code's
fine-tuning loop, but really running ``finetune.steps`` steps (that code, as released, reads a step
count of 0, so its "+full"/"+LoRA" columns equal no fine-tuning: docs/algorithm.md#d9-fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from smat_dist.config import load_config
from smat_dist.data.config import DataConfig
from smat_dist.errors import ConfigError
from smat_dist.smat.config import BackboneConfig

MODES = ("none", "full", "lora")
# The published code's lr search grids: Meta-Dataset sources, and the few-shot OOD sets.
MD_LR_GRID = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1]
FEW_SHOT_LR_GRID = [0.0, 1e-7, 5e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1]


@dataclass
class FinetuneConfig:
    """Test-time fine-tuning on the support set (K AdamW steps from the task's merged weights)."""

    steps: int = 50  # K: PMF's protocol, which the published lr search intends (it runs 0 as released)
    # Full fine-tuning lr when HPS is off: a value of the search grid (1e-4 is the grid's middle
    # and PMF's usual pick for ViT-S; the published code picks one per source with HPS).
    lr: float = 1e-4
    lora_lr: Optional[float] = None  # None = lora_lr_factor x lr (the published code's LoRA lr is 10x)
    lora_lr_factor: float = 10.0
    weight_decay: float = 0.01  # torch AdamW default, which the published code uses
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # DiffAugment-style support augmentation (the published code's --aug): with prob aug_prob per step a
    # batch flip (p 0.5), brightness/saturation/contrast per image, translation up to +-translate.
    augment: bool = True
    aug_prob: float = 0.9
    translate: float = 0.125
    # LoRA (peft): the published code uses r=8, alpha=32, dropout=0.1 on HF ViT "query"/"value". timm ViTs fuse
    # q, k and v into one ``qkv`` Linear, so the default adapts all three projections.
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: List[str] = field(default_factory=lambda: ["qkv"])

    def lr_for(self, mode: str, base: Optional[float] = None) -> float:
        lr = self.lr if base is None else base
        if mode == "lora":
            if base is None and self.lora_lr is not None:
                return float(self.lora_lr)
            return float(lr) * self.lora_lr_factor
        return float(lr)


@dataclass
class HPSConfig:
    """Per-source learning-rate search for the fine-tuning modes.

    The published code (following PMF) tunes on 5 episodes of the *test* classes, so its search
    sees the classes it is then scored on (docs/algorithm.md#d19-hps-split). We default to the
    valid split; a source without one (OOD sources are test-only) falls back to test-split episodes
    disjoint from the scored ones (``fallback: test``, the published protocol) or to
    ``finetune.lr`` (``default``).
    """

    enabled: bool = False
    split: str = "valid"  # valid | test
    fallback: str = "test"  # test | default
    episodes: int = 5
    grid: List[float] = field(default_factory=lambda: list(MD_LR_GRID))  # LoRA uses lora_lr_factor x grid
    max_support_per_class: int = 100


@dataclass
class PreModelConfig:
    """The backbone of ``--method pre`` when no ``--checkpoint`` gives θ_pre."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cosine_scale: float = 10.0


@dataclass
class AnalyseConfig:
    episodes_per_source: int = 20  # frozen test episodes per source for the α / dendrogram figures
    linkage: str = "average"  # scipy.cluster.hierarchy.linkage method
    metric: str = "cosine"  # distance between mean α vectors


@dataclass
class EvalConfig:
    episodes: int = 600  # frozen test episodes per source (MD protocol)
    seed: int = 0  # episode-list seed (the data plane's sampler) and fine-tuning seeds
    split: str = "test"
    sources: List[str] = field(default_factory=list)  # empty = every source with a `split` split
    # ID = sources the model was meta-trained on (the run's data.train_sources; empty there = every
    # source with a train split), for every method: Pre of a run (--method pre --checkpoint RUN)
    # groups as the run does. Set to override, e.g. for Pre from a backbone file (no run to read).
    id_sources: Optional[List[str]] = None
    modes: List[str] = field(default_factory=lambda: ["none"])  # none | full | lora
    episodes_dir: Optional[str] = None  # frozen lists; None = <data.root>/episodes
    # Ray actors evaluating tasks. 0 = in this process (no Ray). N >= 1: N actors on the Ray
    # cluster at $RAY_ADDRESS, an initialised Ray, or a local one started here.
    actors: int = 0
    actor_cpus: Optional[float] = None  # None = min(1, cluster CPUs / actors)
    actor_gpus: Optional[float] = None  # None = min(1, cluster GPUs / actors) (0 without GPUs)
    threads: Optional[int] = None  # torch threads per worker; None = 1 on CPU (actors: max(1, int(actor_cpus)))
    chunk: int = 8  # episodes per actor call
    actor_start_timeout_s: float = 300.0  # actors load torch, timm and the model first
    device: str = "auto"  # auto (cuda when this worker has one) | cpu | cuda
    # fp32 (as the published code tests) | bf16: autocast on the worker's device (CPU too), for the
    # backbone's forwards (features, fine-tuning); α, prototypes and heads stay fp32. The checkpoint's
    # model.precision is not used.
    precision: str = "fp32"
    batch_size: int = 512  # images per no-grad forward
    cache_mb: int = 1024  # decoded eval images kept per worker (the eval transform is deterministic)
    # Features under fixed weights (θ_pre for the hypernetwork; all of Pre/PMF in mode none) computed
    # once per image, a class at a time in row order; false = a forward per episode (same numbers
    # up to float rounding).
    feature_cache: bool = True
    progress_every_s: float = 10.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    hps: HPSConfig = field(default_factory=HPSConfig)
    model: PreModelConfig = field(default_factory=PreModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    analyse: AnalyseConfig = field(default_factory=AnalyseConfig)

    def validate(self) -> None:
        self.data.validate()
        if self.episodes < 1:
            raise ConfigError(f"episodes must be >= 1, got {self.episodes}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes: unknown {bad or '(empty)'}; choose from {list(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"modes: duplicates in {self.modes}")
        if self.split not in ("train", "valid", "test"):
            raise ConfigError(f"split must be train, valid or test, got {self.split!r}")
        if self.actors < 0:
            raise ConfigError(f"actors must be >= 0, got {self.actors}")
        for key in ("actor_cpus", "actor_gpus"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"{key} must be >= 0, got {v}")
        if self.chunk < 1 or self.batch_size < 1:
            raise ConfigError("chunk and batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        ft = self.finetune
        if ft.steps < 0:
            raise ConfigError(f"finetune.steps must be >= 0, got {ft.steps}")
        if ft.lr < 0 or (ft.lora_lr is not None and ft.lora_lr < 0) or ft.lora_lr_factor < 0:
            raise ConfigError("finetune.lr, finetune.lora_lr and finetune.lora_lr_factor must be >= 0")
        if not 0.0 <= ft.aug_prob <= 1.0 or not 0.0 <= ft.translate < 1.0:
            raise ConfigError("finetune.aug_prob must be in [0, 1] and finetune.translate in [0, 1)")
        if len(ft.betas) != 2:
            raise ConfigError(f"finetune.betas needs 2 values, got {ft.betas}")
        if ft.lora_r < 1 or not ft.lora_targets or not 0.0 <= ft.lora_dropout < 1.0:
            raise ConfigError("finetune.lora_r >= 1, finetune.lora_targets non-empty, lora_dropout in [0, 1)")
        h = self.hps
        if h.split not in ("valid", "test"):
            raise ConfigError(f"hps.split must be valid or test, got {h.split!r}")
        if h.fallback not in ("test", "default"):
            raise ConfigError(f"hps.fallback must be test or default, got {h.fallback!r}")
        if h.episodes < 1 or not h.grid or any(v < 0 for v in h.grid):
            raise ConfigError("hps.episodes must be >= 1 and hps.grid a non-empty list of lrs >= 0")
        if self.analyse.episodes_per_source < 1:
            raise ConfigError("analyse.episodes_per_source must be >= 1")


def load_eval_config(overrides=(), yaml_paths=()) -> EvalConfig:
    """EvalConfig from YAML files and a dotlist; a bad key or value is a ConfigError naming it."""
    return load_config(EvalConfig, list(yaml_paths), list(overrides))


__all__ = ["AnalyseConfig", "EvalConfig", "FinetuneConfig", "HPSConfig", "MODES", "MD_LR_GRID",
           "FEW_SHOT_LR_GRID", "PreModelConfig", "load_eval_config"]
