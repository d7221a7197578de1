"""Training and data-plane metrics for Prometheus/Grafana.

* :mod:`.names`     every metric's name, type, help text and labels (the single list);
* :mod:`.recorder`  step dict -> samples; Ray application metrics inside Ray, prometheus_client outside;
* :mod:`.dashboard` the Grafana dashboard under ``cluster/monitoring/``, generated from the names.

Importing this package is cheap (no Ray, no prometheus_client: the recorder's backends import them when
they start): :mod:`smat_dist.config` embeds :class:`MonitorConfig`.
"""

from smat_dist.monitoring.config import MonitorConfig
from smat_dist.monitoring.recorder import StepMonitor, TrainerMonitor, worker_monitor

__all__ = ["MonitorConfig", "worker_monitor", "TrainerMonitor", "StepMonitor"]
