"""The SMAT algorithm in pure torch (no Ray, no DeepSpeed)."""

from smat_dist.smat.config import ModelConfig
from smat_dist.smat.meta_arch import SMAT, StepContext, TaskOutput

__all__ = ["ModelConfig", "SMAT", "StepContext", "TaskOutput"]
