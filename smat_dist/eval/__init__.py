"""Meta-testing (``smat-eval``): frozen episodes, ProtoNet / +full / +LoRA, Table-1 results, Figure-5 analyses.

Public API (imported lazily, so ``import smat_dist.eval`` stays light):

* :func:`evaluate` (``smat_dist.eval.runner``) -> :class:`EvalReport`
* :class:`EvalConfig`, :func:`load_eval_config` (``smat_dist.eval.config``)
* :func:`compare`, :func:`read_results`, :func:`markdown_table` (``smat_dist.eval.report``)
* :func:`paired_table`, :func:`read_episode_scores` (``smat_dist.eval.report``)
* :func:`analyse` (``smat_dist.eval.analyse``)
* :func:`mean_ci95`, :func:`paired_differences`, :func:`episode_interval`, :func:`two_level_interval`,
  :func:`equivalence` (``smat_dist.eval.stats``)
"""

from __future__ import annotations

from smat_dist._lazy import lazy_exports

_EXPORTS = {
    "evaluate": "runner", "EvalReport": "runner",
    "EvalConfig": "config", "load_eval_config": "config", "FinetuneConfig": "config", "HPSConfig": "config",
    "compare": "report", "read_results": "report", "markdown_table": "report", "ResultRow": "report",
    "paired_table": "report", "read_episode_scores": "report",
    "analyse": "analyse", "mean_ci95": "stats", "paired_differences": "stats", "episode_interval": "stats",
    "two_level_interval": "stats", "equivalence": "stats",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
