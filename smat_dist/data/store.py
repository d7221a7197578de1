"""Random access to converted sources: manifests, row indexes and image bytes by byte offset.

A dataset root (local directory or URL, see :mod:`smat_dist.data.location`) holds one directory
per source with its ``manifest.json`` (layout in :mod:`smat_dist.data.format`). Readers never
stream or scan shards: the row index gives each image member's shard and byte offset, and one
``pread`` returns the member's tar header, its bytes and the following ``.cls`` member, which are
checked against the index (key, size, class id) before the bytes are used. Local shards are read
in place through a small LRU of file descriptors (:class:`FilePool`), so open files stay bounded
whatever the number of classes or shards; shards of a remote root are read the same way from the
node-local :class:`~smat_dist.data.cache.ShardCache`, which fetches each whole on first use.

Errors: a missing manifest/shard/index, or a shard whose size differs from the manifest, is one
:class:`DataError` naming the file or URL (raised when a split is first opened; a remote shard's
size and checksum are checked when it is fetched). A bad sample is a :class:`CorruptSample`
carrying shard and key, which the episode builder skips and counts.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.lib import format as npy_format

from smat_dist.data.cache import GiB, Ref, ShardCache
from smat_dist.data.config import DataConfig
from smat_dist.data.format import (BLOCK_EXT, FORMAT, FORMAT_VERSION, IMAGE_EXTS, MANIFEST, ROW_DTYPE, SOURCES_FILE,
                                   NAME_RE, DataError, block_key, check_manifest, parse_key, sample_key, sha256_file)
from smat_dist.data.location import DataRoot, RootError, failure
from smat_dist.data.spec import SourceSpec, load_spec, spec_from_json
from smat_dist.data.tario import BLOCK, padded, parse_header, split_name

HASH_INDEX_BELOW = 64 << 20  # bigger local indexes are checked by size and shape here, by sha256 in `verify`


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


@dataclass(frozen=True)
class Packing:
    """A packed split: up to ``images_per_block`` grey ``height x width`` uint8 images per sample."""

    images_per_block: int
    height: int
    width: int

    @classmethod
    def from_manifest(cls, sp: dict) -> Optional["Packing"]:
        p = sp.get("packed")
        return None if not p else cls(int(p["images_per_block"]), int(p["height"]), int(p["width"]))

    def blocks(self, counts) -> np.ndarray:
        """Blocks per class for image counts ``counts``."""
        return -(-np.asarray(counts, dtype=np.int64) // self.images_per_block)


@dataclass
class SplitIndex:
    """CSR row index of one (source, split): class c owns image rows [class_ptr[i], class_ptr[i+1]).

    ``shard``/``offset``/``size`` are per tar sample: per image row, or, for a packed split, per
    block (class i's blocks start at ``block_ptr[i]``). ``shard_paths`` are paths or URLs."""

    source: str
    split: str
    class_ids: np.ndarray
    class_ptr: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    shard_paths: List[str]
    packed: Optional[Packing] = None

    def __post_init__(self) -> None:
        self._pos = {int(c): i for i, c in enumerate(self.class_ids)}
        self._rows: Optional[Dict[int, Tuple[int, int]]] = None
        self.block_ptr: Optional[np.ndarray] = None
        if self.packed is not None:
            self.block_ptr = np.concatenate([[0], np.cumsum(self.packed.blocks(np.diff(self.class_ptr)))])

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

    def sample_of(self, row: int) -> Tuple[int, int]:
        """(index row of the tar sample holding image ``row``, image number inside that sample)."""
        if self.packed is None:
            return row, 0
        c = self.class_of(row)
        i = self._pos[c]
        j = row - int(self.class_ptr[i])
        return int(self.block_ptr[i]) + j // self.packed.images_per_block, j % self.packed.images_per_block

    def locate(self, row: int) -> Tuple[str, int, int]:
        """(shard path or URL, byte offset, size) of the member holding image ``row``'s data."""
        r, _ = self.sample_of(row)
        return self.shard_paths[int(self.shard[r])], int(self.offset[r]), int(self.size[r])


class SourceStore:
    """One converted source: manifest, spec and (lazily) the per-split indexes."""

    def __init__(self, root: Union[str, Path, DataRoot], name: str,
                 cache: Optional[Callable[[], ShardCache]] = None):
        self.location = root if isinstance(root, DataRoot) else DataRoot(root)
        self.remote = self.location.remote
        self.root = self.location.path if not self.remote else self.location.spec
        self.name = name
        self.dir = self.location.path / name if not self.remote else None
        self._cache_factory = cache
        self._cache: Optional[ShardCache] = None
        rel = f"{name}/{MANIFEST}"
        where = self.location.url(rel)
        if not self.remote and not self.location.local(rel).is_file():
            raise DataError(f"manifest missing: {where} (convert the source, or a conversion was interrupted)")
        try:
            raw = self.location.read_bytes(rel)
        except (OSError, ValueError) as exc:
            raise DataError(f"manifest unreadable: {where} ({failure(exc)})") from None
        try:
            self.manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"manifest unreadable: {where}: {exc}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT \
                or self.manifest.get("version") != FORMAT_VERSION:
            got = self.manifest if not isinstance(self.manifest, dict) else self.manifest.get("format")
            raise DataError(f"{where}: format {got} v{self.manifest.get('version') if isinstance(self.manifest, dict) else '?'}, "
                            f"expected {FORMAT} v{FORMAT_VERSION}")
        if self.manifest.get("source") != name:
            raise DataError(f"{where}: manifest is for source {self.manifest.get('source')!r}, not {name!r}")
        check_manifest(self.manifest, where)  # names and checksums become paths, URLs and cache entries
        self._spec: Optional[SourceSpec] = None
        self._idx: Dict[str, SplitIndex] = {}
        self._refs: Dict[str, List[Ref]] = {}
        self._blocks: Dict[Tuple[str, int], int] = {}  # (split, index row) -> pixel offset of a checked block
        self._lock = threading.Lock()

    def url(self, rel: str) -> str:
        return self.location.url(f"{self.name}/{rel}")

    @property
    def spec(self) -> SourceSpec:
        """The Meta-Dataset spec (read on first use: manifests alone answer which splits exist)."""
        if self._spec is None:
            rel = self.manifest.get("spec", "dataset_spec.json")
            if not self.remote:
                self._spec = load_spec(self.dir / rel)
            else:
                try:
                    d = json.loads(self.location.read_bytes(f"{self.name}/{rel}"))
                except (OSError, ValueError) as exc:
                    raise DataError(f"dataset spec unreadable: {self.url(rel)} ({failure(exc)})") from None
                self._spec = spec_from_json(d, self.url(rel))
        return self._spec

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            if self._cache_factory is None:
                raise DataError(f"{self.location}: a remote root needs a shard cache (data.cache_dir)")
            self._cache = self._cache_factory()
        return self._cache

    def splits(self) -> List[str]:
        return [s for s, v in self.manifest["splits"].items() if v.get("num_images", 0) > 0]

    def index(self, split: str) -> SplitIndex:
        with self._lock:
            if split not in self._idx:
                self._idx[split] = self._load_index(split)
            return self._idx[split]

    def shard_refs(self, split: str) -> List[Ref]:
        """The split's shards as cache references (remote roots)."""
        if split not in self._refs:
            sp = self.manifest["splits"][split]
            self._refs[split] = [Ref(self.url(sh["path"]), sh["sha256"], int(sh["bytes"]), sh["path"])
                                 for sh in sp["shards"]]
        return self._refs[split]

    def _load_index(self, split: str) -> SplitIndex:
        sp = self.manifest["splits"].get(split)
        mwhere = self.url(MANIFEST)
        if sp is None:
            raise DataError(f"{mwhere}: source {self.name} has no {split!r} split (has {self.splits()})")
        try:
            packed = Packing.from_manifest(sp)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{mwhere}: split {split} has a malformed 'packed' entry: {exc!r}") from None
        counts = np.asarray(sp["counts"], dtype=np.int64)
        n_samples = sp["num_images"] if packed is None else int(packed.blocks(counts).sum())
        irel = sp["index"]["path"]
        if not self.remote:
            ipath = self.dir / irel
            if not ipath.is_file():
                raise DataError(f"index missing: {ipath}")
            if ipath.stat().st_size != sp["index"]["bytes"]:
                raise DataError(f"index size {ipath.stat().st_size} differs from manifest ({sp['index']['bytes']}): {ipath}")
            if sp["index"]["bytes"] <= HASH_INDEX_BELOW and sha256_file(ipath) != sp["index"]["sha256"]:
                raise DataError(f"index does not match its manifest checksum: {ipath}")
            shown = str(ipath)
        else:  # fetched whole into the cache, where size and sha256 were checked
            ref = Ref(self.url(irel), sp["index"]["sha256"], int(sp["index"]["bytes"]), irel)
            ipath = self.cache.fetch(ref)
            shown = ref.url
        rows = None
        for _ in range(3):
            try:  # memory-mapped: actors on a node share the page cache; no pickle
                rows = np.load(ipath, mmap_mode="r", allow_pickle=False)
                break
            except FileNotFoundError:  # a cached index evicted between fetch and open
                if not self.remote:
                    raise DataError(f"index missing: {ipath}") from None
                ipath = self.cache.fetch(ref)
            except (ValueError, OSError) as exc:
                raise DataError(f"index unreadable: {shown}: {exc}") from None
        if rows is None:
            raise DataError(f"index unreadable: {shown}: evicted from the shard cache while opening it")
        if rows.dtype != ROW_DTYPE or rows.shape != (n_samples,):
            raise DataError(f"index holds {rows.dtype} {rows.shape}, manifest expects {n_samples} rows: {shown}")
        paths = []
        for sh in sp["shards"]:
            if self.remote:
                paths.append(self.url(sh["path"]))
                continue
            p = self.dir / sh["path"]
            if not p.is_file():
                raise DataError(f"shard missing: {p}")
            if p.stat().st_size != sh["bytes"]:
                raise DataError(f"shard size {p.stat().st_size} differs from manifest ({sh['bytes']}): {p}")
            paths.append(str(p))
        class_ptr = np.concatenate([[0], np.cumsum(counts)])
        idx = SplitIndex(self.name, split, np.asarray(sp["classes"], dtype=np.int64), class_ptr, rows["shard"],
                         rows["offset"], rows["size"], paths, packed)
        if [int(c) for c in idx.class_ids] != list(sp["classes"]) or idx.num_rows != sp["num_images"]:
            raise DataError(f"index disagrees with manifest classes/counts: {shown}")
        if len(rows) and int(idx.shard.max()) >= len(paths):
            raise DataError(f"index refers to shard {int(idx.shard.max())}, manifest lists {len(paths)}: {shown}")
        return idx

    def _pread(self, split: str, shard: int, offset: int, size: int, files: "FilePool") -> bytes:
        if self.remote:
            return self.cache.pread(self.shard_refs(split)[shard], offset, size)
        return files.pread(self.index(split).shard_paths[shard], offset, size)

    def read(self, split: str, row: int, files: "FilePool") -> Tuple[Union[bytes, np.ndarray], str, str]:
        """Image of ``row`` (encoded bytes, or a grey uint8 HxW array from a packed split), its
        extension and key, checked against the tar headers around it."""
        idx = self.index(split)
        if idx.packed is not None:
            return self._read_packed(idx, row, files)
        shard = int(idx.shard[row])
        path, off, size = idx.locate(row)
        key = idx.key(row)
        cls = idx.class_of(row)
        buf = self._pread(split, shard, off - BLOCK, BLOCK + padded(size) + 2 * BLOCK, files)
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
        _check_label(buf[BLOCK + padded(size):], key, cls, path, key)
        return data, ext, key

    def _read_packed(self, idx: SplitIndex, row: int, files: "FilePool") -> Tuple[np.ndarray, str, str]:
        assert idx.packed is not None
        key = idx.key(row)
        r, sub = idx.sample_of(row)
        path = idx.shard_paths[int(idx.shard[r])]
        start = self._blocks.get((idx.split, r))
        if start is None:
            start = self._check_block(idx, r, row, files)
        hw = idx.packed.height * idx.packed.width
        buf = self._pread(idx.split, int(idx.shard[r]), start + sub * hw, hw, files)
        if len(buf) != hw:
            raise CorruptSample("truncated", path, key, f"read {len(buf)} of {hw} pixel bytes")
        return np.frombuffer(buf, dtype=np.uint8).reshape(idx.packed.height, idx.packed.width), BLOCK_EXT, key

    def _check_block(self, idx: SplitIndex, r: int, row: int, files: "FilePool") -> int:
        """Check a block's tar header, .npy header and .cls once; returns where its pixels start."""
        assert idx.packed is not None
        c = idx.class_of(row)
        first, stop = idx.rows(c)
        b = (row - first) // idx.packed.images_per_block
        n = min(idx.packed.images_per_block, stop - first - b * idx.packed.images_per_block)
        bkey = block_key(idx.source, idx.split, c, b)
        shard, off, size = int(idx.shard[r]), int(idx.offset[r]), int(idx.size[r])
        path, key = idx.shard_paths[shard], idx.key(row)
        buf = self._pread(idx.split, shard, off - BLOCK, 2 * BLOCK, files)
        try:
            h = parse_header(buf[:BLOCK])
            if h is None or h.name != f"{bkey}.{BLOCK_EXT}":
                raise ValueError(f"index points at member {h.name if h else 'end of archive'!r}, not {bkey}.{BLOCK_EXT}")
            if h.size != size:
                raise ValueError(f"member holds {h.size} bytes, index says {size}")
            f = io.BytesIO(buf[BLOCK:])
            version = npy_format.read_magic(f)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            hdr = f.tell()
        except ValueError as exc:
            raise CorruptSample("member", path, key, f"block {bkey}: {exc}") from None
        want = (n, idx.packed.height, idx.packed.width)
        if tuple(shape) != want or fortran or dtype != np.uint8 or hdr + n * want[1] * want[2] != size:
            raise CorruptSample("member", path, key, f"block {bkey} holds {dtype} {shape}, expected uint8 {want}")
        tail = self._pread(idx.split, shard, off + padded(size), 2 * BLOCK, files)
        _check_label(tail, bkey, c, path, key)
        self._blocks[(idx.split, r)] = off + hdr
        return off + hdr


def _check_label(buf: bytes, member_key: str, cls: int, path: str, key: str) -> None:
    """``buf`` starts with the ``<member_key>.cls`` member, which must say ``cls``."""
    try:
        ch = parse_header(buf[:BLOCK])
        if ch is None or ch.name != f"{member_key}.cls" or ch.size > BLOCK:
            raise ValueError(f"expected {member_key}.cls after the data, found {ch.name if ch else 'end of archive'}")
        label = buf[BLOCK:BLOCK + ch.size]
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


class Catalog:
    """The sources under a dataset root, opened lazily.

    A local root lists its sources as ``<root>/*/manifest.json``; a URL root reads them from
    ``<root>/sources.json`` (an explicitly named source is opened by its manifest even without
    it). ``local_root``, when it holds converted sources, replaces ``root`` (a node-local copy).
    Shards of a URL root go through a :class:`ShardCache` in ``cache_dir`` (created on first use).
    """

    def __init__(self, root: Union[str, Path, DataRoot], local_root: Optional[str | Path] = None, *,
                 cache_dir: Optional[str] = None, cache_max_gb: Optional[float] = None, remote=None):
        """``remote``: the ``data.remote`` settings (a RemoteConfig; a DataRoot's own, else defaults)."""
        if remote is None and isinstance(root, DataRoot):
            remote = root.limits
        if local_root is not None and Path(local_root).is_dir() and any(Path(local_root).glob("*/manifest.json")):
            root = local_root
        try:
            self.location = root if isinstance(root, DataRoot) else DataRoot(root, remote)
        except RootError as exc:
            raise DataError(str(exc)) from None
        self.remote = self.location.remote
        if not self.remote:
            assert self.location.path is not None
            if not self.location.path.is_dir():
                raise DataError(f"dataset root not found: {self.location.path}")
        # Path for a local root (as before), the URL string for a remote one.
        self.root: Union[Path, str] = self.location.path if not self.remote else self.location.spec
        if cache_dir is None or cache_max_gb is None:
            d = DataConfig()
            cache_dir = d.cache_dir if cache_dir is None else cache_dir
            cache_max_gb = d.cache_max_gb if cache_max_gb is None else cache_max_gb
        self.cache_dir, self.cache_max_gb = cache_dir, float(cache_max_gb)
        self._cache: Optional[ShardCache] = None
        self._stores: Dict[str, SourceStore] = {}
        self._listed: Optional[List[str]] = None
        self._mu = threading.Lock()

    @classmethod
    def for_config(cls, cfg) -> "Catalog":
        """The catalog a :class:`~smat_dist.data.config.DataConfig` describes (root, node-local copy, cache)."""
        return cls(cfg.root, cfg.local_root, cache_dir=cfg.cache_dir, cache_max_gb=cfg.cache_max_gb, remote=cfg.remote)

    @property
    def cache(self) -> ShardCache:
        with self._mu:
            if self._cache is None:
                self._cache = ShardCache(self.cache_dir, int(self.cache_max_gb * GiB), limits=self.location.limits)
            return self._cache

    def sources(self) -> List[str]:
        if not self.remote:
            return sorted(p.parent.name for p in self.location.path.glob("*/manifest.json"))
        if self._listed is None:
            where = self.location.url(SOURCES_FILE)
            try:
                doc = json.loads(self.location.read_bytes(SOURCES_FILE))
                names = doc["sources"]
                if doc.get("format") != FORMAT or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"format {doc.get('format')!r}")
                unsafe = [n for n in names if not NAME_RE.match(n)]
                if unsafe:  # names become directories and URLs
                    raise ValueError(f"field sources: {unsafe[0][:80]!r} is not a source name; refused")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"source list unreadable: {where} ({failure(exc)}); a URL root needs {SOURCES_FILE} "
                                "(`smat-data index ROOT` writes it, `smat-data upload` uploads it)") from None
            self._listed = sorted(names)
        return list(self._listed)

    def store(self, name: str) -> SourceStore:
        if name not in self._stores:
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise DataError(f"source name {str(name)[:80]!r} under {self.root}: only letters, digits, _ and -")
            if not self.remote and not (self.location.path / name).is_dir():
                raise DataError(f"source {name!r} not found under {self.root} (have {self.sources()})")
            if self.remote:
                try:
                    have = self.sources()
                except DataError:
                    have = None  # no source list: an explicitly named source is opened by its manifest
                if have is not None and name not in have:
                    raise DataError(f"source {name!r} not found under {self.root} (have {have})")
            self._stores[name] = SourceStore(self.location, name, (lambda: self.cache) if self.remote else None)
        return self._stores[name]

    def sources_with(self, split: str) -> List[str]:
        return [s for s in self.sources() if split in self.store(s).splits()]


def resolve_sources(cfg, catalog: Catalog, split: str,
                    sources: Optional[Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """The episode's source list and weights: explicit list, else the config's, else all with ``split``."""
    weights = None
    if sources is None:
        if split == "train":
            sources = list(cfg.train_sources) or catalog.sources_with("train")
            weights = list(cfg.source_weights) if cfg.source_weights is not None and cfg.train_sources else None
        else:
            sources = [s for s in cfg.eval_sources] or catalog.sources_with(split)
            sources = [s for s in sources if split in catalog.store(s).splits()]
    else:
        sources = list(sources)
        if cfg.source_weights is not None and sources == list(cfg.train_sources):
            weights = list(cfg.source_weights)
    if not sources:
        raise DataError(f"no source under {catalog.root} has a {split!r} split")
    for s in sources:
        if split not in catalog.store(s).splits():
            raise DataError(f"source {s!r} has no {split!r} split (has {catalog.store(s).splits()}): "
                            f"{catalog.store(s).url(MANIFEST)}")
    return sources, weights


def check_root(cfg, split: str = "train", sources: Optional[Sequence[str]] = None) -> List[str]:
    """Preflight for launchers: the sources ``cfg`` (a DataConfig) resolves to for ``split``.

    Reads only manifests (and, for a URL root without explicit sources, ``sources.json``): no
    index, spec or shard, so it answers in well under a second for local roots and in one small
    request per source for URL roots. Raises :class:`DataError` with one line naming the root,
    source or manifest and what is wrong.
    """
    try:
        catalog = Catalog.for_config(cfg)
        names, _ = resolve_sources(cfg, catalog, split, sources)
    except DataError as exc:
        raise DataError(" ".join(str(exc).split())) from None
    return names


__all__ = ["Catalog", "CorruptSample", "DataError", "FilePool", "Packing", "SourceStore", "SplitIndex",
           "check_root", "resolve_sources"]
