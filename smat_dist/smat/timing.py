"""Wall time of the phases of one meta-step, read once at its end.

A GPU runs behind the host: timing a phase with ``perf_counter`` needs a ``torch.cuda.synchronize``
at each end, which stalls the queue of kernels every task. On CUDA each mark here records an event
on the current stream instead (no host synchronisation); the elapsed times are read after one wait
for the step's last event. On CPU a mark is a ``perf_counter`` reading.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Dict, List, Tuple

import torch


class StepTimer:
    """``start = timer.mark(); ...; timer.add("phase", start)``, then ``timer.totals()`` once."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: List[Tuple[str, Any, Any]] = []
        self._last: Any = None

    def mark(self) -> Any:
        """A point in time: a recorded CUDA event, or a ``perf_counter`` reading."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._last = event
        return event

    def add(self, name: str, start: Any, end: Any = None) -> Any:
        """Count ``start``..``end`` (default: now) towards phase ``name``; returns ``end``."""
        end = self.mark() if end is None else end
        self._spans.append((name, start, end))
        return end

    def totals(self) -> Dict[str, float]:
        """Seconds per phase, summed over its spans (one host wait on a GPU, none on CPU)."""
        out: Dict[str, float] = defaultdict(float)
        if self.cuda and self._last is not None:
            self._last.synchronize()
        for name, start, end in self._spans:
            out[name] += start.elapsed_time(end) / 1000.0 if self.cuda else end - start
        return dict(out)


__all__ = ["StepTimer"]
