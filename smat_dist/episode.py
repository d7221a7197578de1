"""The unit of work shared by the data plane and the algorithm: one few-shot task."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Tuple

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` (the one place data crosses to an accelerator): kept if it is there already (a
    bare ``cuda`` accepts any GPU); a CPU tensor bound for a GPU goes through pinned memory without
    blocking, so the copy overlaps the rank's compute."""
    device = torch.device(device)
    if t.device == device or (device.type == "cuda" and device.index is None and t.device.type == "cuda"):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def num_ways(labels: torch.Tensor) -> int:
    """Number of classes of episode labels ``0..ways-1`` (the one place this is computed)."""
    return int(labels.max().item()) + 1


@dataclass
class Episode:
    """One task: support and query images with episode labels ``0..ways-1``.

    ``index`` is the global episode number ``g``; everything random about the task (its
    classes, images, augmentation and the hypernetwork's selection noise) is a function of
    ``(seed, g)``, which is what makes runs independent of the number of workers.
    """

    support_x: torch.Tensor  # (S, 3, H, W) float32, normalised
    support_y: torch.Tensor  # (S,) int64
    query_x: torch.Tensor  # (Q, 3, H, W)
    query_y: torch.Tensor  # (Q,)
    index: int = -1
    source: str = ""
    classes: Tuple[int, ...] = field(default_factory=tuple)  # absolute class id of each label

    @property
    def ways(self) -> int:
        """Number of classes: known on the host from ``classes`` when the builder set them (no device
        synchronisation inside a meta-step), else read from the labels."""
        return len(self.classes) if self.classes else num_ways(self.support_y)

    def to(self, device: torch.device | str) -> "Episode":
        """This episode on ``device`` (:func:`to_device`; the data plane's loader normalises on the device itself)."""
        return replace(self, support_x=to_device(self.support_x, device), support_y=to_device(self.support_y, device),
                       query_x=to_device(self.query_x, device), query_y=to_device(self.query_y, device))

    def merged(self) -> "Episode":
        """Support and query as one set (Table 2's "no support/query split" ablation)."""
        images = torch.cat([self.support_x, self.query_x])
        labels = torch.cat([self.support_y, self.query_y])
        return replace(self, support_x=images, support_y=labels, query_x=images, query_y=labels)
