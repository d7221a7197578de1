"""Training and data-plane metrics for Prometheus/Grafana.

* :mod:`.names`     every metric's name, type, help text and labels (the single list);
* :mod:`.recorder`  step dict -> samples; Ray application metrics inside Ray, prometheus_client outside;
* :mod:`.dashboard` the Grafana dashboard under ``cluster/monitoring/``, generated from the names.

Importing this package is cheap (no Ray, no prometheus_client): :mod:`smat_dist.config` embeds
:class:`MonitorConfig`.
"""

from smat_dist.monitoring.config import MonitorConfig

__all__ = ["MonitorConfig", "worker_monitor", "TrainerMonitor"]


def __getattr__(name):
    if name in ("worker_monitor", "TrainerMonitor", "StepMonitor"):
        from smat_dist.monitoring import recorder

        return getattr(recorder, name)
    raise AttributeError(name)
