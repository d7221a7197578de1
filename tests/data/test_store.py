"""Reading shards by offset: corrupt samples are skipped, counted and replaced; bad files are named."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from smat_dist.data.builder import EpisodeBuilder, EpisodeSpec, load_episode_list, save_episode_list
from smat_dist.data.store import Catalog, DataError, FilePool
from smat_dist.data.tario import BLOCK, padded, parse_key
from smat_dist.data.verify import verify_source


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _set_header_size(path, header_off, new_size):
    with open(path, "r+b") as f:
        f.seek(header_off)
        h = bytearray(f.read(BLOCK))
        h[124:136] = f"{new_size:011o}\0".encode()
        h[148:156] = b" " * 8
        h[148:156] = f"{sum(h):06o}\0 ".encode()
        f.seek(header_off)
        f.write(bytes(h))


def _check_episode(raw, spec):
    """Declared shots and queries per class are there, with distinct images of the right class."""
    shots = Counter(l for _, l in spec.support)
    assert np.bincount(raw.support_y, minlength=spec.ways).tolist() == [shots[i] for i in range(spec.ways)]
    assert np.bincount(raw.query_y, minlength=spec.ways).tolist() == [len(spec.query) // spec.ways] * spec.ways
    keys = raw.support_keys + raw.query_keys
    assert len(set(keys)) == len(keys)
    for k, lab in zip(keys, np.concatenate([raw.support_y, raw.query_y])):
        assert parse_key(k)[2] == spec.classes[lab]


def test_corrupt_members_are_skipped_counted_and_replaced(writable_copy, make_cfg, caplog):
    root = writable_copy("textures")
    b = EpisodeBuilder(make_cfg(root), "train", seed=0, sources=["textures"])
    spec = next(s for s in map(b.plan, range(50)) if s.ways >= 4 and len(s.support) >= 8)
    store = b.catalog.store("textures")
    idx = store.index("train")
    # four different kinds of damage, on images of the episode (support of 3 classes + a query image)
    by_label = {}
    for k, lab in spec.support:
        by_label.setdefault(lab, k)
    victims = [by_label[0], by_label[1], by_label[2], spec.query[-1][0]]
    locs = [idx.locate(idx.row_of_key(k)) for k in victims]
    (p0, o0, _), (p1, o1, s1), (p2, o2, s2), (p3, o3, _) = locs
    _patch(p0, o0, b"\0" * 16)  # image bytes no decoder recognises
    cls_data = o1 + padded(s1) + BLOCK  # the .cls member's data: claim another class
    c1 = parse_key(victims[1])[2]
    other = c1 + 1 if len(str(c1 + 1)) == len(str(c1)) else c1 - 1
    _patch(p1, cls_data, str(other).encode())
    _set_header_size(p2, o2 - BLOCK, s2 - 7)  # header says the member is shorter than the index does
    _patch(p3, o3 - BLOCK, b"md_garbage_name.jpg\0")  # the index points at some other member
    with caplog.at_level("WARNING"):
        raw = b.materialise(spec, augment=True)
    st = b.stats()
    assert st["skipped_corrupt"] == 4 and st["replaced"] == 4
    assert (st["skipped_decode"], st["skipped_label"], st["skipped_truncated"], st["skipped_member"]) == (1, 1, 1, 1)
    assert not set(victims) & set(raw.support_keys + raw.query_keys)
    _check_episode(raw, spec)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(v in logged for v in victims) and str(p0) in logged
    # a known-bad sample is not read again but is still counted when an episode asks for it
    raw2 = b.materialise(spec, augment=True)
    assert b.stats()["skipped_corrupt"] == 8 and raw2.support_keys == raw.support_keys
    assert np.array_equal(raw2.support, raw.support)  # replacements are deterministic


def test_class_without_enough_good_images_is_an_error(writable_copy, make_cfg):
    root = writable_copy("textures")
    b = EpisodeBuilder(make_cfg(root), "test", seed=0, sources=["textures"])
    idx = b.catalog.store("textures").index("test")
    c = int(idx.class_ids[0])
    lo, hi = idx.rows(c)
    for r in range(lo + 1, hi):  # only one good image left
        p, o, _ = idx.locate(r)
        _patch(p, o, b"\0" * 16)
    spec = EpisodeSpec("textures", "test", 0, 0, 0, [c], [(idx.key(lo + 1), 0), (idx.key(lo + 2), 0)], [])
    with pytest.raises(DataError, match=f"class {c} has no usable image left"):
        b.materialise(spec)


def test_missing_or_mismatched_files_are_named(writable_copy, make_cfg):
    root = writable_copy("glyphs")
    man = json.loads((root / "glyphs" / "manifest.json").read_text())
    shard = root / "glyphs" / man["splits"]["valid"]["shards"][0]["path"]
    shard.rename(shard.with_suffix(".bak"))
    with pytest.raises(DataError, match=f"shard missing: {shard}"):
        EpisodeBuilder(make_cfg(root), "valid", sources=["glyphs"])
    shard.with_suffix(".bak").rename(shard)
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=f"differs from manifest.*{shard}"):
        EpisodeBuilder(make_cfg(root), "valid", sources=["glyphs"])
    with pytest.raises(DataError, match="source 'nope' not found"):
        EpisodeBuilder(make_cfg(root), "train", sources=["glyphs", "nope"])
    (root / "glyphs" / "test" / "rows.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="test/rows.npy"):
        EpisodeBuilder(make_cfg(root), "test", sources=["glyphs"])
    (root / "glyphs" / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest missing: .*glyphs/manifest.json"):
        Catalog(root).store("glyphs")


def test_verify_catches_a_flipped_byte(writable_copy):
    root = writable_copy("glyphs")
    assert verify_source(root, "glyphs") == []
    man = json.loads((root / "glyphs" / "manifest.json").read_text())
    shard = root / "glyphs" / man["splits"]["train"]["shards"][2]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_source(root, "glyphs")
    assert problems and all(str(shard) in p for p in problems)
    assert any("sha256" in p for p in problems)


def test_open_files_stay_bounded(synth_root):
    store = Catalog(synth_root).store("glyphs")
    idx = store.index("train")
    assert len(idx.shard_paths) > 3
    files = FilePool(max_open=2)
    rng = np.random.default_rng(0)
    for r in rng.choice(idx.num_rows, 300, replace=False):
        data, ext, key = store.read("train", int(r), files)
        assert ext == "png" and data[:4] == b"\x89PNG" and idx.row_of_key(key) == r
        assert files.open_count <= 2
    assert files.opens > 2
    files.close()


def test_episode_list_round_trip_and_frozen_materialisation(synth_root, make_cfg, tmp_path):
    b = EpisodeBuilder(make_cfg(synth_root), "test", seed=0, sources=["objects"])
    specs = [b.plan(g) for g in range(5)]
    path = tmp_path / "eps.jsonl"
    assert save_episode_list(specs, path) == 5
    loaded = load_episode_list(path)
    assert loaded == specs
    line = json.loads(path.read_text().splitlines()[0])
    assert {"source", "split", "index", "classes", "seed", "support", "query"} <= set(line)
    assert set(line["support"][0]) == {"key", "label"}
    other = EpisodeBuilder(make_cfg(synth_root), "test", seed=123, sources=["objects"])  # seed of the list wins
    a, c = b.materialise(loaded[2]), other.materialise(loaded[2])
    assert np.array_equal(a.support, c.support) and np.array_equal(a.query_y, c.query_y)
    _check_episode(a, loaded[2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "objects"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_episode_list(bad)


def test_node_local_copy_is_preferred(synth_root, make_cfg, tmp_path):
    cfg = make_cfg(tmp_path / "shared-storage-not-mounted-here", local_root=str(synth_root))
    b = EpisodeBuilder(cfg, "test", seed=0, sources=["digits"])
    assert b.catalog.root == synth_root and len(b.build(0).query_y) > 0
    with pytest.raises(DataError, match="dataset root not found"):
        EpisodeBuilder(make_cfg(tmp_path / "nowhere"), "test")
