"""Frozen evaluation lists: the data plane's sampler, cached, checksummed, validated."""

from __future__ import annotations


import numpy as np
import pytest

from smat_dist.data.cli import main as data_main
from smat_dist.data.config import DataConfig, EpisodeConfig
from smat_dist.data.store import DataError
from smat_dist.eval.episodes import EpisodeReader, frozen_list, list_path, sha256_file


def test_list_is_smat_data_episodes_byte_for_byte_and_cached(eval_root, tmp_path):
    cfg = DataConfig(root=str(eval_root), image_size=16)
    fl = frozen_list(cfg, "textures", "test", 7, 3, tmp_path)
    assert fl.path == tmp_path / "test" / "textures-n7-seed3.jsonl"
    ref = tmp_path / "ref.jsonl"
    assert data_main(["episodes", str(eval_root), "--source", "textures", "--split", "test", "-n", "7",
                      "--seed", "3", "-o", str(ref)]) == 0
    assert fl.path.read_bytes() == ref.read_bytes()
    assert fl.sha256 == sha256_file(ref) and [s.index for s in fl.specs] == list(range(7))
    mtime = fl.path.stat().st_mtime_ns
    again = frozen_list(cfg, "textures", "test", 7, 3, tmp_path)
    assert again.path.stat().st_mtime_ns == mtime and again.sha256 == fl.sha256  # re-read, not rewritten
    # a later start gives later, disjoint episodes (the HPS fallback uses these)
    later = frozen_list(cfg, "textures", "test", 2, 3, tmp_path, start=7)
    assert [s.index for s in later.specs] == [7, 8] and later.path.name == "textures-n2-seed3-start7.jsonl"


def test_other_episode_protocols_get_their_own_file(eval_root, tmp_path):
    cfg = DataConfig(root=str(eval_root), image_size=16, episode=EpisodeConfig(num_ways=5, num_support=1, num_query=3))
    fl = frozen_list(cfg, "digits", "test", 3, 0, tmp_path)
    assert fl.path.name.startswith("digits-n3-seed0-ep") and fl.path != list_path(tmp_path, "digits", "test", 3, 0)
    assert all(s.ways == 5 and len(s.support) == 5 and len(s.query) == 15 for s in fl.specs)


def test_tampered_or_mismatched_lists_are_refused(eval_root, tmp_path):
    cfg = DataConfig(root=str(eval_root), image_size=16)
    fl = frozen_list(cfg, "textures", "test", 3, 0, tmp_path)
    lines = fl.path.read_text().splitlines()
    fl.path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match=r"textures-n3-seed0.jsonl: holds 2 episodes, expected 3"):
        frozen_list(cfg, "textures", "test", 3, 0, tmp_path)
    fl.path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"jsonl:2: episode .*index 2\).*index 1\) was expected"):
        frozen_list(cfg, "textures", "test", 3, 0, tmp_path)
    fl.path.write_text("{not json\n")
    with pytest.raises(DataError, match="not JSON"):
        frozen_list(cfg, "textures", "test", 3, 0, tmp_path)


def test_reader_matches_the_data_plane_materialisation(eval_root, tmp_path):
    from smat_dist.data.builder import EpisodeBuilder
    from smat_dist.data.loader import materialise

    cfg = DataConfig(root=str(eval_root), image_size=16)
    fl = frozen_list(cfg, "digits", "test", 4, 0, tmp_path)
    reader = EpisodeReader(cfg, cache_mb=64)
    builder = EpisodeBuilder(cfg, "test", 0, ["digits"])
    for spec in fl.specs + fl.specs:  # the second pass is served from the cache
        a, b = reader.episode(spec), materialise(spec, builder)
        for f in ("support_x", "support_y", "query_x", "query_y"):
            assert np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy()), f
    st = reader.stats()
    assert st["decoded"] < st["images"] / 2 and st["fallbacks"] == 0
    tiny = EpisodeReader(cfg, cache_mb=0)  # no cache: still correct
    assert np.array_equal(tiny.episode(fl.specs[0]).query_x.numpy(), reader.episode(fl.specs[0]).query_x.numpy())
