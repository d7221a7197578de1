"""The unit of work shared by the data plane and the algorithm: one few-shot task."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Tuple

import torch


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
        return num_ways(self.support_y)

    def to(self, device: torch.device | str) -> "Episode":
        """This episode on ``device``: tensors already there are kept; CPU tensors bound for a GPU go
        through pinned memory without blocking (the data plane's loader normalises on the device itself)."""
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == device or (device.type == "cuda" and device.index is None and t.device.type == "cuda"):
                return t
            if device.type == "cuda" and t.device.type == "cpu":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        return replace(self, support_x=move(self.support_x), support_y=move(self.support_y),
                       query_x=move(self.query_x), query_y=move(self.query_y))

    def merged(self) -> "Episode":
        """Support and query as one set (Table 2's "no support/query split" ablation)."""
        images = torch.cat([self.support_x, self.query_x])
        labels = torch.cat([self.support_y, self.query_y])
        return replace(self, support_x=images, support_y=labels, query_x=images, query_y=labels)
