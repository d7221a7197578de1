"""Tiny distributed runs: a 1-block ViT on 16 px in-memory episodes, gloo on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from smat_dist.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone.name=vit_tiny_patch16_224", "model.backbone.img_size=16", "model.backbone.patch_size=8",
    "model.backbone.embed_dim=32", "model.backbone.depth=1", "model.backbone.num_heads=2",
    "model.backbone.pretrained=false", "model.optim.warmup_epochs=0", "dist.episodes=toy",
    "train.tasks_per_epoch=1000", "dist.cpus_per_worker=1",
]


def tiny_run_config(tmp: Path, name: str, *overrides: str) -> RunConfig:
    args: List[str] = TINY + [f"train.output_dir={tmp}", f"train.run_name={name}", *overrides]
    return load_config(RunConfig, [REPO / "configs" / "smat.yaml"], args)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")
