"""Ablation sweeps (``smat-sweep``): a grid of real smat-train + smat-eval runs on a Ray cluster.

* :mod:`.config`  the typed sweep config (base run config, axes, resources, evaluation, plots);
* :mod:`.grid`    grid -> validated cells with stable identities;
* :mod:`.state`   per-cell state files (atomic), the sweep lock;
* :mod:`.runner`  concurrency, retries, resume, the cluster connection;
* :mod:`.reaper`  the process that stops running cells when the driver dies (standard library only);
* :mod:`.report`  sweep.csv rows and the trade-off / scaling figures.

The package itself imports nothing, so ``python -S -m smat_dist.sweep.reaper`` starts without the
installed dependencies.
"""
