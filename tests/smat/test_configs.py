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
