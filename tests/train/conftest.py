"""Tiny training runs: a 1-block ViT on 16 px in-memory episodes, gloo on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from smat_dist.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone.name=vit_tiny_patch16_224", "model.backbone.img_size=16", "model.backbone.patch_size=8",
    "model.backbone.embed_dim=32", "model.backbone.depth=1", "model.backbone.num_heads=2",
    "model.backbone.pretrained=false", "model.optim.warmup_epochs=0", "data.episodes=toy",
    "train.tasks_per_epoch=1000", "dist.cpus_per_worker=1",
]


def tiny_run_config(tmp: Path, name: str, *overrides: str) -> RunConfig:
    args: List[str] = TINY + [f"train.output_dir={tmp}", f"train.run_name={name}", *overrides]
    return load_config(RunConfig, [REPO / "configs" / "smat.yaml"], args)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def tiny_cfg():
    from tests.smat.conftest import tiny_model_config

    return tiny_model_config()


@pytest.fixture
def toy():
    from smat_dist.smat.toy import ToyEpisodes

    return ToyEpisodes(num_classes=20, image_size=16, ways=5, shots=3, queries=4, seed=0)


def export_params(export_path):
    """Trainable tensors of an export (θ_pre left out)."""
    from smat_dist.export import read_export

    tensors, _ = read_export(export_path)
    return {k: v for k, v in tensors.items() if not k.startswith("backbone.")}


def assert_same(a, b, atol=0.0, rtol=0.0) -> float:
    """Equal tensors (bit-identical by default); returns the worst absolute difference."""
    import torch

    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if atol == 0.0 and rtol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)
        worst = max(worst, float((a[k].double() - b[k].double()).abs().max()))
    return worst


@pytest.fixture(scope="session")
def two_workers(ray_session, tmp_path_factory):
    """A 2-worker Ray run of 4 meta-steps (2 tasks each), checkpoints at steps 2 and 4."""
    from smat_dist.train.ray_launcher import train

    cfg = tiny_run_config(tmp_path_factory.mktemp("ray-runs"), "two", "dist.num_workers=2", "train.tasks_per_step=2",
                          "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    return cfg, train(cfg)
