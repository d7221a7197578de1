"""Ablation sweeps (``smat-sweep``): a grid of real smat-train + smat-eval runs on a Ray cluster.

* :mod:`.config`  the typed sweep config (base run config, axes, resources, evaluation, plots);
* :mod:`.grid`    grid -> validated cells with stable identities;
* :mod:`.state`   per-cell state files (atomic), the sweep lock;
* :mod:`.runner`  concurrency, retries, resume, the cluster connection;
* :mod:`.report`  sweep.csv and the trade-off / scaling figures.
"""

from smat_dist.sweep.config import SweepConfig

__all__ = ["SweepConfig"]
