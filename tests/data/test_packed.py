"""Packed blocks (QuickDraw at real size): B grey images of a class per tar sample as one .npy, with
exactly the episodes and pixels of the one-image-per-sample layout, readable by plain webdataset."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from smat_dist.data.builder import EpisodeBuilder
from smat_dist.data.cli import main as data_main
from smat_dist.data.store import Catalog, FilePool
from smat_dist.data.synth import SynthSource
from smat_dist.data.verify import verify_source
from smat_dist.data.writer import WriteOptions, build_sources

B = 16  # images per block here (QuickDraw: 1024); small so that classes span several blocks


@pytest.fixture(scope="module")
def doodles(tmp_path_factory):
    """The synthetic QuickDraw-like source, converted both ways (plain, packed)."""
    base = tmp_path_factory.mktemp("packed")
    opts = dict(shard_bytes=256 << 10, tier="native", workers=2, progress=False)
    build_sources([SynthSource("doodles")], base / "plain", WriteOptions(**opts))
    build_sources([SynthSource("doodles")], base / "packed", WriteOptions(pack=B, pack_side=28, **opts))
    return base / "plain", base / "packed"


def test_same_episodes_and_pixels_as_one_image_per_sample(doodles, make_cfg):
    plain, packed = doodles
    for split in ("train", "test"):
        a = EpisodeBuilder(make_cfg(plain), split, seed=4, sources=["doodles"])
        b = EpisodeBuilder(make_cfg(packed), split, seed=4, sources=["doodles"])
        for g in range(12):
            sa, sb = a.plan(g), b.plan(g)
            assert sa.to_json() == sb.to_json()
            for augment in (False, True):
                ra, rb = a.materialise(sa, augment), b.materialise(sb, augment)
                assert np.array_equal(ra.support, rb.support) and np.array_equal(ra.query, rb.query)
        assert b.stats()["skipped_corrupt"] == 0 and b.stats()["bytes_read"] > 0


def test_layout_is_plain_webdataset_and_smaller(doodles):
    import webdataset as wds

    plain, packed = doodles
    man = json.loads((packed / "doodles" / "manifest.json").read_text())
    sp = man["splits"]["train"]
    assert sp["packed"] == {"images_per_block": B, "height": 28, "width": 28, "dtype": "uint8"}
    assert sp["index"]["rows"] == sum(-(-n // B) for n in sp["counts"]) < sp["num_images"]
    urls = [str(packed / "doodles" / sh["path"]) for sh in sp["shards"]]
    blocks = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(blocks) == sp["index"]["rows"]
    # block images in order are the plain source's images in row order
    cat = Catalog(plain)
    store, files = cat.store("doodles"), FilePool()
    row = 0
    for s in blocks:
        arr, meta = s["npy"], s["json"]
        assert arr.dtype == np.uint8 and arr.shape == (meta["n"], 28, 28) and 1 <= meta["n"] <= B
        assert int(s["cls"]) == meta["class"] and s["__key__"].endswith(f"_b{meta['first'] // B:06d}")
        for img in arr[:3]:
            data, _, key = store.read("train", row, files)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("L")), img)
            row += 1
        row += len(arr) - min(3, len(arr))
    assert row == sp["num_images"]
    size = {r: sum(sh["bytes"] for s in json.loads((r / "doodles" / "manifest.json").read_text())["splits"].values()
                   for sh in s["shards"]) for r in doodles}
    assert size[packed] < 0.75 * size[plain]  # per-image tar headers (+ padding) were the bulk


def test_verify_and_damage_to_a_block(doodles, make_cfg, tmp_path, serve):
    import shutil

    _, packed = doodles
    root = tmp_path / "root"
    shutil.copytree(packed, root)
    assert verify_source(root, "doodles") == []
    url = serve(root)
    a = EpisodeBuilder(make_cfg(root), "train", seed=1, sources=["doodles"])
    b = EpisodeBuilder(make_cfg(url, cache_dir=str(tmp_path / "cache")), "train", seed=1, sources=["doodles"])
    assert data_main(["verify", url]) == 0
    idx = a.catalog.store("doodles").index("train")

    def victim(spec):  # a support image whose class keeps enough images without that whole block
        for key, lab in spec.support:
            start, stop = idx.rows(spec.classes[lab])
            need = sum(1 for _, l in spec.support + spec.query if l == lab)
            if stop - start - B >= need:
                return key
        return None

    spec = next(s for s in map(a.plan, range(50)) if victim(s))
    assert np.array_equal(a.materialise(spec).support, b.materialise(spec).support)
    # damage the .npy header of the block holding that image: its images are skipped and replaced
    key = victim(spec)
    path, off, _ = idx.locate(idx.row_of_key(key))
    with open(path, "r+b") as f:
        f.seek(off + 8)
        f.write(b"\xff\xff")
    fresh = EpisodeBuilder(make_cfg(root), "train", seed=1, sources=["doodles"])
    raw = fresh.materialise(spec)
    st = fresh.stats()
    assert st["skipped_member"] >= 1 and st["replaced"] == st["skipped_corrupt"]
    assert key not in raw.support_keys and len(raw.support_keys) == len(spec.support)
    problems = verify_source(root, "doodles")
    assert problems and all(path in p for p in problems) and any("sha256 mismatch" in p for p in problems)
    assert data_main(["verify", url, "--source", "doodles"]) == 1


def test_convert_packs_grey_images_and_skips_the_rest(tmp_path, capsys):
    src = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        d = src / f"class{c}"
        d.mkdir(parents=True)
        for i in range(11):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(d / f"{i}.png")
    grey_rgb = np.repeat(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), 3, axis=2)
    Image.fromarray(grey_rgb).save(src / "class0" / "rgb.png")  # grey stored as RGB: accepted
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(src / "class1" / "colour.png")
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(src / "class2" / "big.png")
    out = tmp_path / "out"
    assert data_main(["convert", "--format", "folder", str(src), str(out), "--source", "qd", "--splits", "train=1",
                      "--pack", "4", "--workers", "1", "-q"]) == 0
    assert "2 unreadable inputs skipped" in capsys.readouterr().out
    man = json.loads((out / "qd" / "manifest.json").read_text())
    assert man["splits"]["train"]["counts"] == [12, 11, 11] and man["skipped_inputs"] == 2
    assert man["splits"]["train"]["index"]["rows"] == 3 + 3 + 3
    assert json.loads((out / "sources.json").read_text())["sources"] == ["qd"]
    assert verify_source(out, "qd") == []
    assert data_main(["convert", "--format", "folder", str(src), "http://example.invalid/md", "--source", "qd",
                      "--splits", "train=1", "-q"]) == 2
    assert "converters write to a local directory" in capsys.readouterr().err


def test_export_writes_packed_images_as_png(doodles, tmp_path):
    from smat_dist.data.convert import export_folder

    plain, packed = doodles
    out = export_folder(packed, "doodles", tmp_path / "folder")
    files = sorted(out.glob("*/*.png"))
    man = json.loads((packed / "doodles" / "manifest.json").read_text())
    assert len(files) == sum(sp["num_images"] for sp in man["splits"].values())
    store, fp = Catalog(plain).store("doodles"), FilePool()
    idx = store.index("test")
    for row in (0, idx.num_rows - 1):
        data, _, key = store.read("test", row, fp)
        (f,) = [p for p in files if p.stem == key]
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(io.BytesIO(data)).convert("L")))
