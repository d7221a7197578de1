"""In-memory synthetic episodes for tests and benchmarks of the algorithm (no data plane needed).

Each class is a fixed random low-frequency pattern; an image is its class pattern under a random
gain and offset plus pixel noise, so classes are learnable but not trivially separable. Episode
``g`` is a pure function of ``(seed, g)``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from smat_dist.episode import Episode


class ToyEpisodes:
    def __init__(self, num_classes: int = 40, image_size: int = 32, ways: int = 5, shots: int = 5,
                 queries: int = 5, noise: float = 0.6, seed: int = 0):
        if ways > num_classes:
            raise ValueError("ways > num_classes")
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
        self.patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.ways, self.shots, self.queries, self.noise, self.seed = ways, shots, queries, noise, seed
        self.num_classes = num_classes

    def episode(self, index: int) -> Episode:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        classes = torch.randperm(self.num_classes, generator=generator)[: self.ways]
        per_class = self.shots + self.queries
        patterns = self.patterns[classes].repeat_interleave(per_class, 0)
        gain = 0.7 + 0.6 * torch.rand(patterns.shape[0], 1, 1, 1, generator=generator)
        images = gain * patterns + self.noise * torch.randn(patterns.shape, generator=generator)
        labels = torch.arange(self.ways).repeat_interleave(per_class)
        is_support = (torch.arange(per_class) < self.shots).repeat(self.ways)
        return Episode(
            support_x=images[is_support].contiguous(), support_y=labels[is_support].contiguous(),
            query_x=images[~is_support].contiguous(), query_y=labels[~is_support].contiguous(),
            index=index, source="toy", classes=tuple(int(c) for c in classes),
        )

    def iterate(self, indices: Iterable[int]) -> Iterator[Episode]:
        for index in indices:
            yield self.episode(int(index))
