"""Data-plane fixtures: one synthetic benchmark per test session (built in ~20 s on 2 cores)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The default synthetic benchmark (all seven sources), read-only for tests."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("synth")
    build_synth(str(root), seed=0, scale=1.0,
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=2, progress=False))
    return root


@pytest.fixture
def writable_copy(synth_root, tmp_path):
    """Copy some sources of the benchmark into a scratch root that a test may damage."""

    def copy(*sources: str) -> Path:
        dest = tmp_path / "root"
        dest.mkdir(exist_ok=True)
        for s in sources:
            shutil.copytree(synth_root / s, dest / s)
        return dest

    return copy


@pytest.fixture
def make_cfg():
    """``make_cfg(root, **fields)`` -> DataConfig at 32 px (what the CPU demo trains at)."""
    from smat_dist.data.config import DataConfig

    def make(root, **kw):
        kw.setdefault("image_size", 32)
        cfg = DataConfig(root=str(root), **kw)
        cfg.validate()
        return cfg

    return make
