"""Eval fixtures: a two-source synthetic benchmark and a tiny SMAT export with sparse, distinct experts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
import torch

from smat_dist.smat.config import BackboneConfig, ModelConfig

TINY = dict(name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
ID_SOURCE, OOD_SOURCE = "textures", "digits"


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    """textures (train/valid/test: ID) and digits (test only: OOD), read-only for tests."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("eval-synth")
    build_synth(str(root), seed=0, scale=1.0, sources=(ID_SOURCE, OOD_SOURCE),
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=2, progress=False))
    return root


def make_tiny_export(run_dir: Path, method: str = "smat", seed: int = 0, *, train_sources: Sequence[str] = (),
                     edit: Optional[Callable] = None, **model_changes) -> Path:
    """Train one meta-step on toy episodes, then give the experts distinct sparse masks and a
    non-zero θδ (a one-step model is ~θ_pre), and export as smat-train does.

    ``train_sources`` becomes the run's ``data.train_sources``; ``edit(model)`` may change the
    model (θ_pre included) just before the export.
    """
    from smat_dist.config import to_dict
    from smat_dist.train.config import TrainConfig
    from smat_dist.export import export_model
    from smat_dist.smat import SMAT
    from smat_dist.smat.toy import ToyEpisodes
    from smat_dist.train.launch import Trainer

    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig(backbone=BackboneConfig(**TINY), method=method), **model_changes)
    model = SMAT(cfg)
    tc = TrainConfig(tasks_per_step=2, max_steps=1, seed=seed)
    Trainer(model, tc, run_dir=run_dir).fit(ToyEpisodes(num_classes=10, image_size=16, ways=3, shots=2, queries=2),
                                            steps=1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.delta.normal_(0.0, 0.05, generator=g)
        if model.gates is not None:
            M, G = model.gates.logits.shape
            keep = torch.linspace(0.1, 0.5, M)[:, None]
            model.gates.logits.copy_(torch.where(torch.rand(M, G, generator=g) < keep, 4.0, -4.0))
        if model.hypernet is not None:
            model.hypernet.keys.mul_(20.0)  # make α depend visibly on the task
        if edit is not None:
            edit(model)
    run = {"data": {"train_sources": list(train_sources)}, "model": to_dict(cfg)}
    return export_model(model, run_dir / "model.safetensors", tc, extra={"run_config": json.dumps(run)})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny-run")
    make_tiny_export(run)
    return run


def eval_overrides(root: Path, *extra: str):
    return [f"data.root={root}", "episodes=6", "progress_every_s=-1", "finetune.steps=3", *extra]
