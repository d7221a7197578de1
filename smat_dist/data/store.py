"""Random access to converted sources: manifests, row indexes and image bytes by byte offset.

A dataset root holds one directory per source with its ``manifest.json`` (see
:mod:`smat_dist.data.writer`). Readers never stream or scan shards: the row index gives each
image member's shard and byte offset, and one ``pread`` returns the member's tar header, its
bytes and the following ``.cls`` member, which are checked against the index (key, size,
class id) before the bytes are used. File descriptors are held in a small LRU
(:class:`FilePool`), so open files stay bounded whatever the number of classes or shards.

Errors: a missing manifest/shard/index, or a shard whose size differs from the manifest, is one
:class:`DataError` naming the file (raised when a split is first opened). A bad sample is a
:class:`CorruptSample` carrying shard and key, which the episode builder skips and counts.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from smat_dist.data.spec import SourceSpec, load_spec
from smat_dist.data.tario import BLOCK, IMAGE_EXTS, padded, parse_header, parse_key, sample_key, split_name
from smat_dist.data.writer import FORMAT, FORMAT_VERSION, ROW_DTYPE, sha256_file

HASH_INDEX_BELOW = 64 << 20  # bigger indexes are checked by size and shape here, by sha256 in `verify`


class DataError(RuntimeError):
    """Dataset files missing or inconsistent with their manifest; the message names the file."""


class CorruptSample(Exception):
    """One unusable sample. ``reason`` is one of decode | member | label | truncated."""

    def __init__(self, reason: str, shard: str, key: str, detail: str = ""):
        super().__init__(f"{reason}: {shard} [{key}] {detail}".strip())
        self.reason, self.shard, self.key, self.detail = reason, shard, key, detail


class FilePool:
    """At most ``max_open`` read-only descriptors, least recently used closed first."""

    def __init__(self, max_open: int = 64):
        self.max_open = max(1, int(max_open))
        self._fds: "OrderedDict[str, int]" = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise DataError(f"shard missing: {path}") from exc
        self.opens += 1
        self._fds[path] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def pread(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fd(path)
            return os.pread(fd, size, offset)

    @property
    def open_count(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class SplitIndex:
    """CSR row index of one (source, split): class c owns rows [class_ptr[i], class_ptr[i+1])."""

    source: str
    split: str
    class_ids: np.ndarray
    class_ptr: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    shard_paths: List[str]

    def __post_init__(self) -> None:
        self._pos = {int(c): i for i, c in enumerate(self.class_ids)}
        self._rows: Optional[Dict[int, Tuple[int, int]]] = None

    @property
    def num_rows(self) -> int:
        return int(self.class_ptr[-1])

    def has_class(self, class_id: int) -> bool:
        return int(class_id) in self._pos

    def rows(self, class_id: int) -> Tuple[int, int]:
        i = self._pos.get(int(class_id))
        if i is None:
            raise KeyError(f"{self.source}/{self.split}: unknown class {class_id}")
        return int(self.class_ptr[i]), int(self.class_ptr[i + 1])

    def class_rows(self) -> Dict[int, Tuple[int, int]]:
        if getattr(self, "_rows", None) is None:
            self._rows = {int(c): (int(self.class_ptr[i]), int(self.class_ptr[i + 1]))
                          for i, c in enumerate(self.class_ids)}
        return self._rows

    def class_of(self, row: int) -> int:
        i = int(np.searchsorted(self.class_ptr, row, side="right")) - 1
        if not 0 <= row < self.num_rows:
            raise IndexError(f"{self.source}/{self.split}: row {row} out of range")
        return int(self.class_ids[i])

    def key(self, row: int) -> str:
        c = self.class_of(row)
        return sample_key(self.source, self.split, c, row - self.rows(c)[0])

    def row_of_key(self, key: str) -> int:
        source, split, c, j = parse_key(key)
        if source != self.source or split != self.split:
            raise KeyError(f"key {key} is not in {self.source}/{self.split}")
        start, stop = self.rows(c)
        if not 0 <= j < stop - start:
            raise KeyError(f"key {key}: class {c} has {stop - start} images")
        return start + j

    def locate(self, row: int) -> Tuple[str, int, int]:
        return self.shard_paths[int(self.shard[row])], int(self.offset[row]), int(self.size[row])


class SourceStore:
    """One converted source: manifest, spec and (lazily) the per-split indexes."""

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root)
        self.name = name
        self.dir = self.root / name
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"manifest missing: {mpath} (convert the source, or a conversion was interrupted)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest unreadable: {mpath}: {exc}") from exc
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise DataError(f"{mpath}: format {self.manifest.get('format')} v{self.manifest.get('version')}, "
                            f"expected {FORMAT} v{FORMAT_VERSION}")
        if self.manifest.get("source") != name:
            raise DataError(f"{mpath}: manifest is for source {self.manifest.get('source')!r}, not {name!r}")
        self.spec: SourceSpec = load_spec(self.dir / self.manifest.get("spec", "dataset_spec.json"))
        self._idx: Dict[str, SplitIndex] = {}
        self._lock = threading.Lock()

    def splits(self) -> List[str]:
        return [s for s, v in self.manifest["splits"].items() if v.get("num_images", 0) > 0]

    def index(self, split: str) -> SplitIndex:
        with self._lock:
            if split not in self._idx:
                self._idx[split] = self._load_index(split)
            return self._idx[split]

    def _load_index(self, split: str) -> SplitIndex:
        sp = self.manifest["splits"].get(split)
        if sp is None:
            raise DataError(f"{self.dir / 'manifest.json'}: source {self.name} has no {split!r} split "
                            f"(has {self.splits()})")
        ipath = self.dir / sp["index"]["path"]
        if not ipath.is_file():
            raise DataError(f"index missing: {ipath}")
        if ipath.stat().st_size != sp["index"]["bytes"]:
            raise DataError(f"index size {ipath.stat().st_size} differs from manifest ({sp['index']['bytes']}): {ipath}")
        if sp["index"]["bytes"] <= HASH_INDEX_BELOW and sha256_file(ipath) != sp["index"]["sha256"]:
            raise DataError(f"index does not match its manifest checksum: {ipath}")
        try:  # memory-mapped: actors on a node share the page cache; no pickle
            rows = np.load(ipath, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"index unreadable: {ipath}: {exc}") from None
        if rows.dtype != ROW_DTYPE or rows.shape != (sp["num_images"],):
            raise DataError(f"index holds {rows.dtype} {rows.shape}, manifest expects {sp['num_images']} rows: {ipath}")
        paths = []
        for sh in sp["shards"]:
            p = self.dir / sh["path"]
            if not p.is_file():
                raise DataError(f"shard missing: {p}")
            if p.stat().st_size != sh["bytes"]:
                raise DataError(f"shard size {p.stat().st_size} differs from manifest ({sh['bytes']}): {p}")
            paths.append(str(p))
        class_ptr = np.concatenate([[0], np.cumsum(np.asarray(sp["counts"], dtype=np.int64))])
        idx = SplitIndex(self.name, split, np.asarray(sp["classes"], dtype=np.int64), class_ptr, rows["shard"],
                         rows["offset"], rows["size"], paths)
        if [int(c) for c in idx.class_ids] != list(sp["classes"]) or idx.num_rows != sp["num_images"]:
            raise DataError(f"index disagrees with manifest classes/counts: {ipath}")
        if idx.num_rows and int(idx.shard.max()) >= len(paths):
            raise DataError(f"index refers to shard {int(idx.shard.max())}, manifest lists {len(paths)}: {ipath}")
        return idx

    def read(self, split: str, row: int, files: FilePool) -> Tuple[bytes, str, str]:
        """Image bytes, extension and key of ``row``, checked against the tar headers around it."""
        idx = self.index(split)
        path, off, size = idx.locate(row)
        key = idx.key(row)
        cls = idx.class_of(row)
        buf = files.pread(path, off - BLOCK, BLOCK + padded(size) + 2 * BLOCK)
        if len(buf) < BLOCK + size:
            raise CorruptSample("truncated", path, key, f"read {len(buf)} of {BLOCK + size} bytes")
        try:
            h = parse_header(buf[:BLOCK])
        except ValueError as exc:
            raise CorruptSample("member", path, key, str(exc)) from None
        if h is None:
            raise CorruptSample("member", path, key, "index points at an end-of-archive block")
        mkey, ext = split_name(h.name)
        if mkey != key or ext not in IMAGE_EXTS:
            raise CorruptSample("member", path, key, f"index points at member {h.name!r}")
        if h.size != size:
            raise CorruptSample("truncated", path, key, f"member holds {h.size} bytes, index says {size}")
        data = buf[BLOCK:BLOCK + size]
        cpos = BLOCK + padded(size)
        try:
            ch = parse_header(buf[cpos:cpos + BLOCK])
            if ch is None or ch.name != f"{key}.cls" or ch.size > BLOCK:
                raise ValueError(f"expected {key}.cls after the image, found {ch.name if ch else 'end of archive'}")
            label = buf[cpos + BLOCK:cpos + BLOCK + ch.size]
            if len(label) != ch.size:
                raise ValueError("short .cls member")
        except ValueError as exc:
            raise CorruptSample("member", path, key, str(exc)) from None
        try:
            got = int(label.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSample("label", path, key, f"unparseable class {label[:20]!r}") from None
        if got != cls:
            raise CorruptSample("label", path, key, f"class {got}, index says {cls}")
        return data, ext, key


class Catalog:
    """The sources under a dataset root (``<root>/*/manifest.json``), opened lazily."""

    def __init__(self, root: str | Path, local_root: Optional[str | Path] = None):
        root = Path(root)
        if local_root is not None and Path(local_root).is_dir() and any(Path(local_root).glob("*/manifest.json")):
            root = Path(local_root)
        if not root.is_dir():
            raise DataError(f"dataset root not found: {root}")
        self.root = root
        self._stores: Dict[str, SourceStore] = {}

    def sources(self) -> List[str]:
        return sorted(p.parent.name for p in self.root.glob("*/manifest.json"))

    def store(self, name: str) -> SourceStore:
        if name not in self._stores:
            if not (self.root / name).is_dir():
                raise DataError(f"source {name!r} not found under {self.root} (have {self.sources()})")
            self._stores[name] = SourceStore(self.root, name)
        return self._stores[name]

    def sources_with(self, split: str) -> List[str]:
        return [s for s in self.sources() if split in self.store(s).splits()]


__all__ = ["Catalog", "CorruptSample", "DataError", "FilePool", "SourceStore", "SplitIndex"]
