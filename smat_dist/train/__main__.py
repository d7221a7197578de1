"""``python -m smat_dist.train`` / ``torchrun --nproc-per-node N -m smat_dist.train``."""

import sys

from smat_dist.train.cli import main_local

sys.exit(main_local())
