"""Input formats: MD TFRecords, PMF/SMAT per-class h5, image folders (and export back to folders).

Each is an :class:`~smat_dist.data.writer.InputSource`; :func:`convert` hands it to
:func:`~smat_dist.data.writer.build_source`.

* ``tfrecord``: ``SRC/dataset_spec.json`` + one ``{class_id}.tfrecords`` per class (the spec's
  ``file_pattern``); records are ``tf.train.Example`` with ``image`` bytes and ``label`` int64.
* ``h5``: the same layout with ``{class_id}.h5``; groups ``"0".."n-1"`` hold ``image`` (uint8
  HxWx3 decoded pixels), ``label`` and ``id``. Pixels are stored losslessly (PNG) by default.
* ``folder``: one sub-folder per class. Splits from ``--split-file`` (MD ``splits/*.json``
  style ``{"train": [names], "valid": [...], "test": [...]}``), from ``--splits`` fractions
  (classes permuted with seed 22, as MD generates missing splits), or, without either, from a
  ``dataset_spec.json`` in SRC whose class names are the folder names (what
  :func:`export_folder` writes, so hierarchies survive a round trip).

A record whose label disagrees with its file's class, or whose image cannot be read, is
skipped, named in a warning and counted in the manifest (``skipped_inputs``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from smat_dist.data.spec import SPLITS, SourceSpec, flat_spec, load_spec, save_spec
from smat_dist.data.store import Catalog, FilePool
from smat_dist.data.tfrecord import TFRecordError, iter_records, parse_example
from smat_dist.data.writer import ClassEntry, ConvertError, InputSource, WriteOptions, build_source
from smat_dist.fsutil import read_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
SPLIT_SEED = 22  # MD's seed for generated class splits


class _SpecSource(InputSource):
    """Shared by TFRecord and h5 inputs: per-class files named by the spec's file pattern."""

    suffix = ""

    def __init__(self, src: str | Path, name: str):
        self.src = str(Path(src).resolve())
        self.name = name
        spec_path = Path(self.src) / "dataset_spec.json"
        if not spec_path.is_file():
            raise ConvertError(f"{self.fmt} input needs {spec_path}")
        self._spec_path = str(spec_path)
        raw = read_json(spec_path, ConvertError, "dataset spec")
        pattern = str(raw.get("file_pattern", "{}.tfrecords"))
        if pattern.count("{}") != 1:
            raise ConvertError(f"{spec_path}: file_pattern {pattern!r} is not one file per class")
        self.pattern = re.sub(r"\.tfrecords?$", self.suffix, pattern) if self.suffix != ".tfrecords" else pattern

    def spec(self) -> SourceSpec:
        s = load_spec(self._spec_path)
        s.name = self.name
        return s

    def entries(self) -> List[ClassEntry]:
        s = self.spec()
        out = []
        for split in SPLITS:
            for c in s.classes(split):
                path = Path(self.src) / self.pattern.format(c)
                if not path.is_file():
                    raise ConvertError(f"class {c} file missing: {path}")
                out.append(ClassEntry(c, s.class_names.get(c, str(c)), split))
        return sorted(out, key=lambda e: e.class_id)

    def origin(self) -> dict:
        return {"format": self.fmt, "path": self.src, "spec_sha": _sha(self._spec_path)}


def _sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TFRecordSource(_SpecSource):
    fmt = "tfrecord"
    suffix = ".tfrecords"

    def read_class(self, entry: ClassEntry) -> Iterator[Tuple[object, dict]]:
        path = str(Path(self.src) / self.pattern.format(entry.class_id))
        try:
            for i, (off, payload) in enumerate(iter_records(path)):
                ref = f"{Path(path).name}@{off}"
                try:
                    ex = parse_example(payload)
                    image = ex["image"][0]
                    label = int(ex["label"][0])
                except (TFRecordError, KeyError, IndexError, TypeError, ValueError) as exc:
                    yield ValueError(f"unparseable record: {exc!r}"), {"ref": ref}
                    continue
                if label != entry.class_id:
                    yield ValueError(f"label {label} in the file of class {entry.class_id}"), {"ref": ref}
                    continue
                yield image, {"ref": ref, "record": i}
        except TFRecordError as exc:  # framing lost: the rest of this file is unreadable
            yield ValueError(str(exc)), {"ref": Path(path).name}


class H5Source(_SpecSource):
    fmt = "h5"
    suffix = ".h5"

    def read_class(self, entry: ClassEntry) -> Iterator[Tuple[object, dict]]:
        import h5py

        path = Path(self.src) / self.pattern.format(entry.class_id)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise ConvertError(f"cannot open {path}: {exc}") from exc
        with f:
            names = sorted(f.keys(), key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
            for g in names:
                ref = f"{path.name}:{g}"
                try:
                    grp = f[g]
                    img = np.asarray(grp["image"][()])
                    label = int(np.asarray(grp["label"][()]).reshape(-1)[0])
                    rec_id = int(np.asarray(grp["id"][()]).reshape(-1)[0]) if "id" in grp else -1
                except Exception as exc:
                    yield ValueError(f"unreadable group: {exc!r}"), {"ref": ref}
                    continue
                if label != entry.class_id:
                    yield ValueError(f"label {label} in the file of class {entry.class_id}"), {"ref": ref}
                    continue
                if img.ndim == 3 and img.shape[2] == 1:
                    img = img[:, :, 0]
                yield np.ascontiguousarray(img.astype(np.uint8, copy=False)), {"ref": ref, "tfrecord_offset": rec_id}


class FolderSource(InputSource):
    fmt = "folder"

    def __init__(self, src: str | Path, name: str, splits: Optional[Dict[str, float]] = None,
                 split_file: Optional[str | Path] = None):
        self.src = str(Path(src).resolve())
        self.name = name
        root = Path(self.src)
        if not root.is_dir():
            raise ConvertError(f"image folder not found: {root}")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ConvertError(f"{root}: no class folders")
        self._base_spec: Optional[SourceSpec] = None
        if split_file is not None:
            assign = _read_split_file(Path(split_file), folders)
            self._split_desc = {"split_file": str(Path(split_file).resolve())}
        elif splits is not None:
            assign = fraction_splits(folders, splits)
            self._split_desc = {"splits": dict(splits)}
        elif (root / "dataset_spec.json").is_file():
            self._base_spec = load_spec(root / "dataset_spec.json")
            self._base_spec.name = name
            by_name = {v: k for k, v in self._base_spec.class_names.items()}
            if sorted(by_name) != folders:
                extra = sorted(set(folders) ^ set(by_name))[:5]
                raise ConvertError(f"{root / 'dataset_spec.json'}: class names and folders differ (e.g. {extra})")
            assign = {s: [self._base_spec.class_names[c] for c in self._base_spec.classes(s)] for s in SPLITS}
            self._split_desc = {"spec": str(root / "dataset_spec.json")}
        else:
            raise ConvertError(f"{root}: give --splits or --split-file (or put a dataset_spec.json there)")
        self._classes: List[Tuple[int, str, str]] = []
        for s in SPLITS:
            for n in assign.get(s, []):
                self._classes.append((len(self._classes), n, s))

    def entries(self) -> List[ClassEntry]:
        return [ClassEntry(c, n, s) for c, n, s in self._classes]

    def _files(self, name: str) -> List[Path]:
        d = Path(self.src) / name
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def spec(self) -> SourceSpec:
        counts = {c: len(self._files(n)) for c, n, _ in self._classes}
        if self._base_spec is not None:
            s = self._base_spec
            s.images_per_class.update(counts)
            return s
        per_split = {s: sum(1 for _, _, sp in self._classes if sp == s) for s in SPLITS}
        return flat_spec(self.name, per_split, counts, {c: n for c, n, _ in self._classes})

    def read_class(self, entry: ClassEntry) -> Iterator[Tuple[object, dict]]:
        for p in self._files(entry.name):
            try:
                data = p.read_bytes()
            except OSError as exc:
                yield ValueError(str(exc)), {"ref": f"{entry.name}/{p.name}"}
                continue
            yield data, {"ref": f"{entry.name}/{p.name}"}

    def origin(self) -> dict:
        return {"format": self.fmt, "path": self.src, **self._split_desc}


def _read_split_file(path: Path, folders: Sequence[str]) -> Dict[str, List[str]]:
    d = read_json(path, ConvertError, "split file")
    unknown = [k for k in d if k not in SPLITS]
    if unknown:
        raise ConvertError(f"{path}: unknown split names {unknown} (use train/valid/test)")
    listed = [n for s in SPLITS for n in d.get(s, [])]
    missing = sorted(set(listed) - set(folders))
    if missing:
        raise ConvertError(f"{path}: classes without a folder: {missing[:5]}")
    if len(set(listed)) != len(listed):
        raise ConvertError(f"{path}: a class is listed twice")
    return {s: list(d.get(s, [])) for s in SPLITS}


def parse_fractions(text: str) -> Dict[str, float]:
    """``"train=0.7,valid=0.15,test=0.15"`` -> dict; ``"test=1"`` puts every class in test."""
    out: Dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in SPLITS:
            raise ConvertError(f"--splits: unknown split {k!r} (use train, valid, test)")
        try:
            out[k] = float(v)
        except ValueError:
            raise ConvertError(f"--splits: {part!r} is not split=fraction") from None
    if not out or any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConvertError(f"--splits fractions must be >= 0 and sum to 1, got {text!r}")
    return out


def fraction_splits(names: Sequence[str], fractions: Dict[str, float]) -> Dict[str, List[str]]:
    """Largest-remainder class counts; classes permuted with seed 22, sorted by name inside a split."""
    n = len(names)
    exact = {s: fractions.get(s, 0.0) * n for s in SPLITS}
    counts = {s: int(np.floor(v)) for s, v in exact.items()}
    for s in sorted(SPLITS, key=lambda s: -(exact[s] - counts[s]))[: n - sum(counts.values())]:
        counts[s] += 1
    perm = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(n)
    shuffled = [sorted(names)[i] for i in perm]
    out, start = {}, 0
    for s in SPLITS:
        out[s] = sorted(shuffled[start:start + counts[s]])
        start += counts[s]
    return out


FORMATS = {"tfrecord": TFRecordSource, "h5": H5Source, "folder": FolderSource}


def make_source(fmt: str, src: str | Path, name: str, splits: Optional[str] = None,
                split_file: Optional[str] = None) -> InputSource:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r} (use {sorted(FORMATS)})")
    if fmt == "folder":
        return FolderSource(src, name, parse_fractions(splits) if splits else None, split_file)
    if splits or split_file:
        raise ConvertError(f"--splits/--split-file apply to folder inputs; {fmt} inputs carry dataset_spec.json")
    return FORMATS[fmt](src, name)


def convert(fmt: str, src: str | Path, out: str | Path, name: str, opts: Optional[WriteOptions] = None,
            splits: Optional[str] = None, split_file: Optional[str] = None) -> Path:
    return build_source(make_source(fmt, src, name, splits, split_file), out, opts)


def export_folder(root: str | Path, source: str, out: str | Path) -> Path:
    """Write a converted source back as an image-folder tree (+ its dataset_spec.json)."""
    from PIL import Image

    store = Catalog(root).store(source)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    files = FilePool(8)
    try:
        for split in store.splits():
            idx = store.index(split)
            for c in idx.class_ids:
                name = store.spec.class_names.get(int(c), f"c{int(c):05d}")
                if not re.match(r"^[A-Za-z0-9_.,+ -]+$", name) or name.startswith("."):
                    raise ConvertError(f"class name {name!r} is not a safe folder name")
                d = dest / name
                d.mkdir(exist_ok=True)
                start, stop = idx.rows(int(c))
                for r in range(start, stop):
                    data, ext, key = store.read(split, r, files)
                    if isinstance(data, np.ndarray):  # a packed split's grey pixels
                        Image.fromarray(data, "L").save(d / f"{key}.png")
                    else:
                        (d / f"{key}.{ext}").write_bytes(data)
        save_spec(store.spec, dest / "dataset_spec.json")
    finally:
        files.close()
    return dest


__all__ = ["FolderSource", "H5Source", "TFRecordSource", "convert", "export_folder", "fraction_splits",
           "make_source", "parse_fractions", "FORMATS"]

