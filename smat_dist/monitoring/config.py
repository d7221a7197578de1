"""Typed settings of training/data-plane monitoring (the ``monitor:`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from smat_dist.errors import ConfigError

BACKENDS = ("auto", "ray", "prometheus")


@dataclass
class MonitorConfig:
    enabled: bool = True
    # auto: Ray application metrics inside Ray workers (they join Ray's per-node Prometheus export),
    # a prometheus_client HTTP endpoint elsewhere (single-process trainer, tools).
    backend: str = "auto"
    # prometheus_client endpoint: loopback by default, so nothing is exposed beyond this machine.
    address: str = "127.0.0.1"
    port: int = 0  # 0 = an ephemeral port, announced in targets_dir
    # Each prometheus_client endpoint writes a Prometheus file-SD target file here (removed at exit);
    # cluster/monitoring/prometheus.yml watches this directory. None = do not announce.
    targets_dir: Optional[str] = "/tmp/smat-dist/prometheus"
    every: int = 1  # record every N-th meta-step

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"monitor.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"monitor.port must be in 0..65535, got {self.port}")
        if self.every < 1:
            raise ConfigError(f"monitor.every must be >= 1, got {self.every}")


__all__ = ["MonitorConfig", "BACKENDS"]
