"""The SMAT algorithm in pure torch (no Ray, no DeepSpeed).

Public API (imported lazily, so ``smat_dist.smat.config`` loads without torch):
:class:`ModelConfig` (``config``), :class:`SMAT`, :class:`StepContext`, :class:`TaskOutput` (``meta_arch``).
"""

from smat_dist._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ModelConfig": "config", "SMAT": "meta_arch", "StepContext": "meta_arch", "TaskOutput": "meta_arch",
})
