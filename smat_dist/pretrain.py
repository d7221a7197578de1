"""The "P" of P>M>F for small benchmarks: supervised pre-training of a ViT on the training classes.

Real runs start from DINO weights; the synthetic benchmark has no such model, so the demo makes a
meaningful θ_pre itself: a ViT trained to classify the union of the in-distribution sources'
*training* classes (never their valid/test classes, never an OOD source). The result is a
backbone file that ``model.backbone.checkpoint`` loads.

    python -m smat_dist.pretrain --data data/synth --out runs/demo/backbone.safetensors [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from smat_dist.config import ConfigError, load_config
from smat_dist.data.config import AugmentConfig, IMAGENET_MEAN, IMAGENET_STD
from smat_dist.data.store import Catalog, DataError
from smat_dist.data.stream import shard_samples
from smat_dist.data.transforms import EpisodeTransform
from smat_dist.errors import require
from smat_dist.smat.backbone import build_backbone, save_backbone
from smat_dist.smat.config import BackboneConfig


@dataclass
class PretrainConfig:
    data: str = "data/synth"  # dataset root: local directory or URL
    sources: List[str] = field(default_factory=list)  # empty = every source with a train split
    out: str = "runs/backbone.safetensors"
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                               embed_dim=96, depth=4, num_heads=3)
    )
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.35
    seed: int = 0
    threads: Optional[int] = None

    def validate(self) -> None:
        self.backbone.validate("backbone")
        for name in ("epochs", "batch_size"):
            require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        for name in ("lr", "weight_decay", "warmup_epochs"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", self.label_smoothing)
        require(0.0 < self.crop_scale_min <= 1.0, "crop_scale_min", "in (0, 1]", self.crop_scale_min)
        require(self.threads is None or self.threads >= 1, "threads", ">= 1 or null", self.threads)


def load_train_images(root: str, sources: List[str], image_size: int) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """All training-split images of ``sources`` (eval transform) as uint8 (N, 3, S, S) + global labels.

    One sequential pass over the shards through webdataset's pipeline (``root`` may be a URL);
    each shard's bytes are checked against the manifest as they stream past. Shards hold the rows
    in index order, so image ``i`` here is row ``i`` of the split."""
    import io

    catalog = Catalog(root)
    names = sources or catalog.sources_with("train")
    if not names:
        raise ConfigError(f"no source with a train split under {root}")
    tf = EpisodeTransform(image_size, AugmentConfig(), train=False)
    images, labels, offset = [], [], 0
    for name in names:
        store = catalog.store(name)
        sp = store.manifest["splits"].get("train")
        if sp is None:
            raise DataError(f"{store.url('manifest.json')}: source {name} has no train split")
        pos = {int(c): i for i, c in enumerate(sp["classes"])}
        n = 0
        for sample in shard_samples(store.shard_refs("train"), limits=catalog.location.limits):
            label = offset + pos[int(sample["cls"])]
            if "npy" in sample:  # a packed block of grey images
                block = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            else:
                block = [sample["jpg"] if "jpg" in sample else sample["png"]]
            for img in block:
                images.append(tf(img, None))
                labels.append(label)
                n += 1
        if n != sp["num_images"]:
            raise DataError(f"{store.url('manifest.json')}: train shards hold {n} images, manifest says "
                            f"{sp['num_images']}")
        offset += len(sp["classes"])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), names


def _augment(x: torch.Tensor, gen: torch.Generator, scale_min: float) -> torch.Tensor:
    """Batch random-resized-crop + horizontal flip on float images (N, 3, S, S)."""
    n, _, s, _ = x.shape
    area = scale_min + (1 - scale_min) * torch.rand(n, generator=gen)
    side = area.sqrt()
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - side)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - side)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 1, 1] = side
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pretrain(cfg: PretrainConfig, log=print) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x8, y, names = load_train_images(cfg.data, cfg.sources, cfg.backbone.img_size)
    classes = int(y.max()) + 1
    log(f"[pretrain] {len(y)} training images of {classes} classes from {', '.join(names)} "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    bcfg = BackboneConfig(**{**cfg.backbone.__dict__, "pretrained": False, "checkpoint": None})
    model = build_backbone(bcfg)
    model.requires_grad_(True).train()
    head = torch.nn.Linear(model.num_features, classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        correct = seen = 0
        loss_sum = 0.0
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            warm = cfg.warmup_epochs * steps_per_epoch
            lr = cfg.lr * (step / max(1, warm) if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for g in opt.param_groups:
                g["lr"] = lr
            xb = (_augment(x8[idx].float() / 255.0, gen, cfg.crop_scale_min) - mean) / std
            logits = head(model(xb))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y[idx]).sum())
            seen += len(idx)
        log(f"[pretrain] epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} train acc {correct / seen:.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
    model.eval().requires_grad_(False)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = {k: v for k, v in bcfg.__dict__.items() if k not in ("pretrained", "checkpoint")}
    save_backbone(model, out, extra={"pretrain_sources": ",".join(names), "pretrain_classes": str(classes),
                                     "backbone_config": json.dumps(arch)})
    log(f"[pretrain] wrote {out} in {time.perf_counter() - t0:.0f}s")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smat_dist.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", help="PretrainConfig dotlist, e.g. epochs=10 backbone.depth=2")
    a = ap.parse_args(argv)
    extra = [f"data={a.data}"] if a.data else []
    extra += [f"out={a.out}"] if a.out else []
    try:
        cfg = load_config(PretrainConfig, [], a.overrides + extra)
    except ConfigError as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
