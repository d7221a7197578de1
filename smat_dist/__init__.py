"""smat-dist: distributed meta-training of SMAT (Sparse MeTa-Tuning) on Ray Train + DeepSpeed."""

import os as _os

# OpenMP threads that spin while they wait turn every parallel region into a ~10x slowdown when
# the cores are shared (measured on the 2-core CI box: a ViT fwd+bwd took 2.7 s with 2 spinning
# threads, 0.26 s with passive waiting). It must be set before torch loads its OpenMP runtime,
# so here, before any submodule imports torch; an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
