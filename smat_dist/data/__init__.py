"""Data plane: Meta-Dataset sources as WebDataset shards, the MD episode protocol, Ray episode actors.

Public API (imported lazily so that converter worker processes stay light):

* :class:`DataConfig`, :class:`EpisodeConfig`, :class:`AugmentConfig` (``smat_dist.data.config``)
* :class:`EpisodeLoader`, :func:`rank_indices`, :func:`materialise` (``smat_dist.data.loader``)
* :class:`EpisodeBuilder`, :class:`EpisodeSpec`, :func:`load_episode_list`,
  :func:`save_episode_list` (``smat_dist.data.builder``)
* :class:`DataError`, :class:`Catalog`, :func:`check_root` (launcher preflight: manifests only)
  (``smat_dist.data.store``)
* :class:`DataRoot`, :func:`is_url`, :func:`resolve_root` (local path or URL roots,
  ``smat_dist.data.location``); :class:`ShardCache` (node-local shard cache, ``smat_dist.data.cache``)
* the pure sampler in ``smat_dist.data.sampler``; converters in ``smat_dist.data.convert``;
  the synthetic benchmark in ``smat_dist.data.synth``; the ``smat-data`` CLI in ``smat_dist.data.cli``.
"""

from __future__ import annotations

from smat_dist._lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "config", "EpisodeConfig": "config", "AugmentConfig": "config",
    "EpisodeLoader": "loader", "rank_indices": "loader", "materialise": "loader",
    "EpisodeBuilder": "builder", "EpisodeSpec": "builder", "RawEpisode": "builder",
    "load_episode_list": "builder", "save_episode_list": "builder",
    "DataError": "store", "Catalog": "store", "check_root": "store",
    "DataRoot": "location", "is_url": "location", "resolve_root": "location", "ShardCache": "cache",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
