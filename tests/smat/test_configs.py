"""Baselines and Table-2 ablations are configs of the same code: each runs a meta-step."""

from pathlib import Path

import pytest
import torch

from smat_dist.config import RunConfig, load_config
from smat_dist.train.config import TrainConfig
from smat_dist.smat import SMAT
from smat_dist.train.launch import Trainer

from .conftest import TINY

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_OVERRIDES = [f"model.backbone.{k}={v}" for k, v in TINY.items()] + [
    "model.backbone.pretrained=false",
    f"data.image_size={TINY['img_size']}",
    "model.optim.warmup_epochs=0",  # the first epoch of a warm-up has lr 0
]

# config -> (θδ rows, has gates, has hypernet, uses teacher KD, inner steps, support/query split)
EXPECTED = {
    "smat.yaml": (1, True, True, True, 1, True),
    "pmf.yaml": (1, False, False, False, 0, True),
    "softmerge.yaml": (8, False, True, False, 1, True),
    "ablations/no_dense_teacher.yaml": (1, True, True, False, 1, True),
    "ablations/no_interpolated_experts.yaml": (8, True, True, True, 1, True),
    "ablations/no_meta_split.yaml": (1, True, True, True, 1, False),
    "ablations/no_sparsity_no_ie.yaml": (8, False, True, True, 1, True),
    "ablations/no_distillation.yaml": (1, True, True, False, 1, True),
    "ablations/pmf_distill_pre.yaml": (1, False, False, False, 0, True),
    "ablations/single_dense_expert.yaml": (1, False, False, True, 1, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_runs_a_meta_step_with_the_expected_trainable_set(name, toy):
    cfg = load_config(RunConfig, [CONFIGS / name], TINY_OVERRIDES)
    rows, gated, hyper, teacher, inner, split = EXPECTED[name]
    model = SMAT(cfg.model)
    groups = model.trainable_parameters()
    n = model.space.numel
    assert tuple(model.delta.shape) == (rows, n)
    assert bool(groups["masks"]) == gated and bool(groups["lagrange"]) == gated
    assert bool(groups["hypernet"]) == hyper
    assert (cfg.model.teacher.enabled and cfg.model.teacher.kd_weight > 0) == teacher
    assert cfg.model.inner.steps == inner and cfg.model.meta_split == split
    trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = trainer.train_step(list(toy.iterate(range(2))))
    assert torch.isfinite(torch.tensor(m.loss))
    assert (m.teacher_ce is not None) == teacher
    assert not torch.equal(before["delta"], model.delta.detach())  # θδ trained in every method
    if hyper:
        assert not torch.equal(before["hypernet.keys"], model.hypernet.keys.detach())


SHIPPED = sorted(str(p.relative_to(CONFIGS)) for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("ablations/*.yaml")])


def test_every_shipped_method_config_is_covered():
    assert SHIPPED == sorted(EXPECTED)


# bf16 has 8 significant bits (unit roundoff 2^-9 ≈ 2e-3). Only the backbone runs in it, so a
# task loss carries the rounding of a few backbone layers' features (the merge, hypernetwork and
# losses are fp32, pinned bit-exactly under autocast by test_merge/test_hypernet): measured at
# most 7.5e-4 relative over these 3 steps for every config. 1e-2 (5 unit roundoffs, 13x the
# measurement) leaves room for the trajectories to drift apart, and still fails a step that
# goes wrong in bf16 only (a loss term lost or scaled, a NaN, an fp32/bf16 mismatch).
BF16_LOSS_RTOL = 1e-2


@pytest.mark.parametrize("name", SHIPPED)
def test_bf16_training_is_finite_and_close_to_fp32(name, toy):
    """What a GPU run does differently: bf16 autocast (CPU autocast behaves alike for matmuls)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(RunConfig, [CONFIGS / name], TINY_OVERRIDES + [f"model.precision={precision}"])
        torch.manual_seed(0)
        model = SMAT(cfg.model)
        trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1))
        losses[precision] = torch.tensor([trainer.train_step(list(toy.iterate(range(2 * s, 2 * s + 2)))).loss
                                          for s in range(3)], dtype=torch.float64)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert bool(torch.isfinite(losses["bf16"]).all())
    assert not torch.equal(losses["bf16"], losses["fp32"])  # the backbone really ran in bf16
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=BF16_LOSS_RTOL, atol=0)


# The attribution study's variants (configs/sweeps/toy_attribution.yaml): the demo's SMAT or PMF with exactly
# one part removed or added. Which model fields each changes, and the KD terms it trains with.
ATTRIBUTION = {
    "smat.yaml": ("smat", {}, (True, True)),
    "attribution/no_dense_teacher.yaml": ("smat", {"teacher.enabled": False}, (False, True)),
    "attribution/no_distillation.yaml": ("smat", {"teacher.enabled": False, "teacher.kd_weight": 0.0}, (False, False)),
    "attribution/single_dense_expert.yaml": ("smat", {"gates.enabled": False, "gates.num_experts": 1,
                                                      "hypernet.enabled": False, "optim.delta_lr": 0.01}, (True, True)),
    "pmf.yaml": ("pmf", {}, (False, False)),
    "attribution/pmf_distill_pre.yaml": ("pmf", {"teacher.kd_weight": 0.25},
                                         (False, True)),
}


def _flat(obj, prefix=""):
    import dataclasses

    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(_flat(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else {f"{prefix}{f.name}": v})
    return out


def test_attribution_sweep_is_the_demo_with_one_part_changed_and_every_variant_trains(toy):
    import dataclasses

    from smat_dist.smat.config import BackboneConfig
    from smat_dist.sweep.config import load_sweep_config
    from smat_dist.sweep.grid import expand

    sweep = CONFIGS / "sweeps" / "toy_attribution.yaml"
    cells = expand(load_sweep_config(sweep), sweep)
    demo = {m: load_config(RunConfig, [CONFIGS / "demo" / f"{m}.yaml"]) for m in ("smat", "pmf")}
    by_config = {}
    for c in cells:
        by_config.setdefault(c.run.model.method, []).append(c)
    assert len(by_config) == len(ATTRIBUTION) and all(len(v) >= 5 for v in by_config.values())  # >= 5 seeds each
    assert all(sorted(x.run.train.seed for x in v) == [0, 1, 2, 3, 4] for v in by_config.values())
    for name, (base, changes, (teacher, pre_kd)) in ATTRIBUTION.items():
        cfg = load_config(RunConfig, [CONFIGS / "demo" / name])
        got, ref = _flat(cfg.model), _flat(demo[base].model)
        diff = {k: got[k] for k in got if got[k] != ref[k] and k != "method"}
        assert diff == changes, name
        assert cfg.train == dataclasses.replace(demo[base].train, run_name=cfg.train.run_name)
        # builds and trains on a tiny backbone
        model_cfg = dataclasses.replace(cfg.model, backbone=BackboneConfig(**TINY), precision="fp32")
        model = SMAT(model_cfg)
        trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=1))
        m = trainer.train_step(list(toy.iterate(range(2))))
        assert torch.isfinite(torch.tensor(m.loss)), name
        assert (m.teacher_ce is not None) == teacher, name
        assert (m.pre_acc is not None) == pre_kd, name  # the θ_pre target is computed only when distilled from
