"""Converters: TFRecord (written by the independent `tfrecord` package), PMF h5 and image folders."""

from __future__ import annotations

import hashlib
import io
import json

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from smat_dist.data.convert import FolderSource, convert, fraction_splits, parse_fractions
from smat_dist.data.spec import flat_spec, load_spec, save_spec, spec_from_json, spec_to_json
from smat_dist.data.store import Catalog, FilePool
from smat_dist.data.verify import verify_source
from smat_dist.data.writer import ConvertError, WriteOptions, build_source, plan_shards

SPLIT_SIZES = {"train": 6, "valid": 3, "test": 3}


def _opts(**kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("tier", "native")
    return WriteOptions(**kw)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """12 classes of 5-9 small JPEGs, as TFRecords + spec, PMF h5 + spec, and class folders + split file."""
    from tfrecord.writer import TFRecordWriter

    base = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    names = [f"class_{i:02d}" for i in range(12)]
    images = {}
    for c, name in enumerate(names):
        images[c] = []
        for j in range(int(rng.integers(5, 10))):
            arr = rng.integers(0, 256, (int(rng.integers(18, 30)), int(rng.integers(18, 30)), 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            images[c].append(buf.getvalue())
    counts = {c: len(v) for c, v in images.items()}
    spec = flat_spec("src", SPLIT_SIZES, counts, dict(enumerate(names)))

    tfr = base / "tfrecord"
    tfr.mkdir()
    save_spec(spec, tfr / "dataset_spec.json", file_pattern="{}.tfrecords")
    for c, imgs in images.items():
        w = TFRecordWriter(str(tfr / f"{c}.tfrecords"))
        for b in imgs:
            w.write({"image": (b, "byte"), "label": (c, "int")})
        w.close()

    h5 = base / "h5"
    h5.mkdir()
    save_spec(spec, h5 / "dataset_spec.json", file_pattern="{}.tfrecords")  # PMF keeps the MD spec unchanged
    for c, imgs in images.items():
        with h5py.File(h5 / f"{c}.h5", "w") as f:
            for j, b in enumerate(imgs):
                g = f.create_group(str(j))
                g.create_dataset("image", data=np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
                g.create_dataset("label", data=np.int64(c))
                g.create_dataset("id", data=np.int64(1000 + j))

    folder = base / "folder"
    for c, imgs in images.items():
        d = folder / names[c]
        d.mkdir(parents=True)
        for j, b in enumerate(imgs):
            (d / f"img_{j:03d}.jpg").write_bytes(b)
    split_file = base / "splits.json"
    split_file.write_text(json.dumps({"train": names[:6], "valid": names[6:9], "test": names[9:]}))
    return {"images": images, "names": names, "tfrecord": tfr, "h5": h5, "folder": folder, "split_file": split_file}


def _summary(root: Path, name: str):
    man = json.loads((root / name / "manifest.json").read_text())
    return {s: (sp["classes"], sp["counts"], sp["num_images"]) for s, sp in man["splits"].items()}


def _class_bytes(root: Path, name: str):
    store = Catalog(root).store(name)
    files = FilePool(4)
    out = {}
    for split in store.splits():
        idx = store.index(split)
        for c in idx.class_ids:
            lo, hi = idx.rows(int(c))
            out[int(c)] = [store.read(split, r, files)[0] for r in range(lo, hi)]
    files.close()
    return out


def _pixels(b: bytes) -> str:
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).tobytes()).hexdigest()


def test_three_formats_give_the_same_manifest_counts(image_set, tmp_path):
    out = tmp_path / "out"
    convert("tfrecord", image_set["tfrecord"], out, "from_tfr", _opts(workers=2))
    convert("h5", image_set["h5"], out, "from_h5", _opts())
    convert("folder", image_set["folder"], out, "from_dir", _opts(), split_file=str(image_set["split_file"]))
    expect = {s: (list(range(lo, lo + n)), [len(image_set["images"][c]) for c in range(lo, lo + n)],
                  sum(len(image_set["images"][c]) for c in range(lo, lo + n)))
              for s, n, lo in (("train", 6, 0), ("valid", 3, 6), ("test", 3, 9))}
    for name in ("from_tfr", "from_h5", "from_dir"):
        assert _summary(out, name) == expect, name
        assert verify_source(out, name) == []
        spec = load_spec(out / name / "dataset_spec.json")
        assert spec.classes("valid") == [6, 7, 8] and spec.images_per_class == {c: len(v) for c, v in image_set["images"].items()}
    # TFRecord and folder inputs keep the JPEG bytes; h5 pixels are stored losslessly
    originals = image_set["images"]
    for name in ("from_tfr", "from_dir"):
        got = _class_bytes(out, name)
        assert {c: sorted(v) for c, v in got.items()} == {c: sorted(v) for c, v in originals.items()}
    got = _class_bytes(out, "from_h5")
    assert {c: sorted(map(_pixels, v)) for c, v in got.items()} == {c: sorted(map(_pixels, v)) for c, v in originals.items()}


def test_bad_input_records_are_skipped_and_counted(image_set, tmp_path):
    from tfrecord.writer import TFRecordWriter

    src = tmp_path / "tfr"
    src.mkdir()
    for p in image_set["tfrecord"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    w = TFRecordWriter(str(src / "0.tfrecords"))  # rewrite class 0 with one wrong label and one non-image
    imgs = image_set["images"][0]
    for b in imgs:
        w.write({"image": (b, "byte"), "label": (0, "int")})
    w.write({"image": (imgs[0], "byte"), "label": (5, "int")})
    w.write({"image": (b"not an image", "byte"), "label": (0, "int")})
    w.close()
    m = json.loads(convert("tfrecord", src, tmp_path / "out", "bad", _opts()).read_text())
    assert m["skipped_inputs"] == 2
    assert m["splits"]["train"]["counts"][0] == len(imgs)


def test_folder_fraction_splits():
    names = [f"n{i:02d}" for i in range(20)]
    s = fraction_splits(names, parse_fractions("train=0.7,valid=0.15,test=0.15"))
    assert [len(s[k]) for k in ("train", "valid", "test")] == [14, 3, 3]
    assert sorted(s["train"] + s["valid"] + s["test"]) == names
    assert s == fraction_splits(list(reversed(names)), parse_fractions("train=0.7,valid=0.15,test=0.15"))
    assert fraction_splits(names, parse_fractions("test=1")) == {"train": [], "valid": [], "test": names}
    with pytest.raises(ConvertError):
        parse_fractions("train=0.7,valid=0.2")
    with pytest.raises(ConvertError):
        parse_fractions("training=1")


def test_folder_test_only_source(image_set, tmp_path):
    src = FolderSource(image_set["folder"], "ood", splits=parse_fractions("test=1"))
    build_source(src, tmp_path, _opts())
    assert Catalog(tmp_path).store("ood").splits() == ["test"]
    assert _summary(tmp_path, "ood")["test"][2] == sum(len(v) for v in image_set["images"].values())


def test_plan_shards_class_contiguous():
    def side(c, n):
        return {"class": c, "n": n, "bytes": n, "samples": [[i, i, 1, i + 1] for i in range(n)]}

    plan = plan_shards([side(0, 3), side(1, 3), side(2, 10), side(3, 2)], target=5)
    assert [s.segments for s in plan] == [
        [(0, 0, 3, 3)],  # class 1 would overflow -> new shard
        [(1, 0, 3, 3)],
        [(2, 0, 5, 5)],  # class 2 is bigger than the target: it continues into the next shard
        [(2, 5, 10, 5)],
        [(3, 0, 2, 2)],
    ]


class _FlakyFolder(FolderSource):
    """A folder input that dies on one class (a crash mid-conversion) and records what it read."""

    fail_on = None
    reads: list = []

    def read_class(self, entry):
        type(self).reads.append(entry.class_id)
        if entry.class_id == self.fail_on:
            raise RuntimeError("simulated crash")
        yield from super().read_class(entry)


def test_resumable_and_idempotent(image_set, tmp_path):
    split_file = str(image_set["split_file"])
    opts = _opts(shard_bytes=8 * 1024)
    clean = tmp_path / "clean"
    build_source(FolderSource(image_set["folder"], "s", split_file=split_file), clean, opts)
    ref = json.loads((clean / "s" / "manifest.json").read_text())
    assert sum(len(sp["shards"]) for sp in ref["splits"].values()) > 3  # small target: several shards

    out = tmp_path / "out"
    flaky = _FlakyFolder(image_set["folder"], "s", split_file=split_file)
    _FlakyFolder.fail_on, _FlakyFolder.reads = 7, []
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_source(flaky, out, opts)
    assert not (out / "s" / "manifest.json").exists()
    first = list(_FlakyFolder.reads)
    _FlakyFolder.fail_on, _FlakyFolder.reads = None, []
    build_source(flaky, out, opts)
    assert sorted(_FlakyFolder.reads) == sorted(set(range(12)) - set(first[:-1]))  # finished classes skipped
    assert (out / "s" / "manifest.json").read_bytes() == (clean / "s" / "manifest.json").read_bytes()

    # a complete conversion is not redone
    _FlakyFolder.reads = []
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "s").rglob("*.tar")}
    build_source(flaky, out, opts)
    assert _FlakyFolder.reads == [] and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # a lost shard is rewritten, identical; the others are kept
    lost = out / "s" / ref["splits"]["train"]["shards"][1]["path"]
    lost.unlink()
    build_source(flaky, out, opts)
    assert lost.is_file()
    assert (out / "s" / "manifest.json").read_bytes() == (clean / "s" / "manifest.json").read_bytes()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != lost)
    assert verify_source(out, "s") == []


def test_shards_are_plain_webdataset(synth_root):
    import webdataset as wds

    man = json.loads((synth_root / "glyphs" / "manifest.json").read_text())
    sp = man["splits"]["train"]
    urls = [str(synth_root / "glyphs" / sh["path"]) for sh in sp["shards"]]
    assert len(urls) > 1
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert "." not in s["__key__"]
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["class"] and meta["source"] == "glyphs"
        assert Image.open(io.BytesIO(s["png"])).size == (36, 36)
        n += 1
    assert n == sp["num_images"]


def test_spec_json_round_trip(synth_root):
    for name, kind in (("objects", "HierarchicalDatasetSpecification"), ("glyphs", "BiLevelDatasetSpecification"),
                       ("textures", "DatasetSpecification")):
        raw = json.loads((synth_root / name / "dataset_spec.json").read_text())
        assert raw["__class__"] == kind
        spec = spec_from_json(raw)
        again = spec_to_json(spec, raw["path"], raw["file_pattern"])
        assert again == raw
    objects = json.loads((synth_root / "objects" / "dataset_spec.json").read_text())
    # MD layout: split keys upper-case, internal nodes carry the sum of their leaves
    train = objects["images_per_class"]["TRAIN"]
    assert train["n_root"] == sum(v for k, v in train.items() if k.count("_") == 3)


def test_convert_errors_name_the_file(tmp_path):
    with pytest.raises(ConvertError, match="dataset_spec.json"):
        convert("tfrecord", tmp_path, tmp_path / "o", "x", _opts())
    (tmp_path / "a").mkdir()
    with pytest.raises(ConvertError, match="--splits"):
        convert("folder", tmp_path, tmp_path / "o", "x", _opts())
    with pytest.raises(ConvertError, match="no dots"):
        convert("folder", tmp_path, tmp_path / "o", "bad.name", _opts(), splits="test=1")



def test_s256_tier_downsizes_big_images_and_keeps_lossless_inputs_lossless(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    big = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))
    big.save(src / "a" / "big.jpg", quality=90)
    small_bmp = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(small_bmp).save(src / "a" / "small.bmp")
    small_jpg = (src / "a" / "small.jpg")
    Image.fromarray(small_bmp).save(small_jpg, quality=90)
    convert("folder", src, tmp_path / "out", "tier", _opts(tier="s256"), splits="test=1")
    got = {}
    for data in _class_bytes(tmp_path / "out", "tier")[0]:
        im = Image.open(io.BytesIO(data))
        got[(im.format, im.size)] = data
    assert set(got) == {("JPEG", (384, 256)), ("PNG", (20, 30)), ("JPEG", (20, 30))}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[("PNG", (20, 30))]))), small_bmp)  # lossless
    assert got[("JPEG", (20, 30))] == small_jpg.read_bytes()  # small JPEG: bytes kept
