"""Tiny randomly initialised ViTs and in-memory episodes for the algorithm tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smat_dist.smat.config import BackboneConfig, ModelConfig
from smat_dist.smat.toy import ToyEpisodes

TINY = dict(name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def tiny_model_config(**changes) -> ModelConfig:
    cfg = ModelConfig(backbone=BackboneConfig(**TINY))
    return dataclasses.replace(cfg, **changes)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture
def toy() -> ToyEpisodes:
    return ToyEpisodes(num_classes=20, image_size=16, ways=5, shots=3, queries=4, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
