"""Check a converted dataset against its manifests: checksums, counts, index and tar consistency.

Every problem is one line naming the file or URL (shard, index or manifest) it was found in. A
flipped byte anywhere in a shard shows up as a sha256 mismatch; ``deep`` additionally checks every
sample (image or block + ``.cls`` + ``.json``, class id, key) against the row index, which
localises the damage to a key. A local root is checked in place (the tar headers are walked by
offset, so the index's offsets are checked too); a URL root is streamed shard by shard through
webdataset's pipeline (:mod:`smat_dist.data.stream`) without touching the shard cache.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from smat_dist.data.cache import Ref
from smat_dist.data.format import (BLOCK_EXT, IMAGE_EXTS, MANIFEST, ROW_DTYPE, SPEC_FILE, DataError, check_manifest,
                                   check_rel_path, parse_block_key, parse_key, sha256_bytes, sha256_file)
from smat_dist.data.location import DataRoot, failure
from smat_dist.data.spec import SpecError, spec_from_json
from smat_dist.data.store import Catalog, Packing
from smat_dist.data.stream import shard_samples
from smat_dist.data.tario import iter_members, split_name

Root = Union[str, Path, DataRoot]
Members = Dict[str, Dict[str, Tuple[Optional[int], int]]]  # key -> ext -> (data offset or None, size)


def _loc(root: Root) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


def verify_source(root: Root, name: str, deep: bool = True) -> List[str]:
    loc = _loc(root)

    def where(rel: str) -> str:
        return loc.url(f"{name}/{rel}")

    if not loc.remote and not loc.local(f"{name}/{MANIFEST}").is_file():
        return [f"{where(MANIFEST)}: manifest missing"]
    try:
        man = json.loads(loc.read_bytes(f"{name}/{MANIFEST}"))
    except (OSError, ValueError) as exc:
        return [f"{where(MANIFEST)}: unreadable manifest ({failure(exc)})"]
    try:
        check_manifest(man, where(MANIFEST))
    except DataError as exc:
        return [str(exc)]
    problems: List[str] = []
    srel = man.get("spec", SPEC_FILE)
    try:
        spec = spec_from_json(json.loads(loc.read_bytes(f"{name}/{srel}")), where(srel))
    except SpecError as exc:
        return [str(exc)]
    except (OSError, ValueError) as exc:
        return [f"{where(srel)}: unreadable dataset spec ({failure(exc)})"]
    for split, sp in man.get("splits", {}).items():
        counts = dict(zip(sp["classes"], sp["counts"]))
        if sorted(counts) != spec.classes(split):
            problems.append(f"{where(srel)}: split {split} classes differ from {where(MANIFEST)}")
        for c, n in counts.items():
            if spec.images_per_class.get(c) != n:
                problems.append(f"{where(srel)}: class {c} count {spec.images_per_class.get(c)} != manifest {n}")
                break
        try:
            rel_paths = [check_rel_path(r, where(MANIFEST)) for r in [sp["index"]["path"]] + [sh["path"] for sh in sp["shards"]]]
            packed = Packing.from_manifest(sp)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{where(MANIFEST)}: split {split}: {exc}")
            continue
        irel = rel_paths[0]
        try:
            if not loc.remote and not loc.local(f"{name}/{irel}").is_file():
                raise FileNotFoundError(irel)
            raw = loc.read_bytes(f"{name}/{irel}")
        except (OSError, ValueError) as exc:
            problems.append(f"{where(irel)}: index {'missing' if isinstance(exc, FileNotFoundError) else 'unreadable'}"
                            f" ({failure(exc)})")
            continue
        if sha256_bytes(raw) != sp["index"]["sha256"]:
            problems.append(f"{where(irel)}: index checksum mismatch")
            continue
        rows = np.load(io.BytesIO(raw), allow_pickle=False)
        per_class = np.asarray(sp["counts"], dtype=np.int64) if packed is None else packed.blocks(sp["counts"])
        if rows.dtype != ROW_DTYPE or rows.shape != (int(per_class.sum()),) or sp["num_images"] != sum(sp["counts"]):
            problems.append(f"{where(irel)}: {rows.shape[0]} rows, manifest expects {int(per_class.sum())}")
            continue
        shard, offset, size = rows["shard"], rows["offset"], rows["size"]
        rows_per_shard = np.bincount(shard.astype(np.int64), minlength=len(sp["shards"]))
        expected: Dict[str, tuple] = {}
        if deep:  # "<shard>/<class>/<sample in class>" -> (offset, size)
            ptr = np.concatenate([[0], np.cumsum(per_class)])
            for i, c in enumerate(sp["classes"]):
                for j in range(int(per_class[i])):
                    r = int(ptr[i]) + j
                    expected[f"{int(shard[r])}/{c}/{j}"] = (int(offset[r]), int(size[r]))
        for si, sh in enumerate(sp["shards"]):
            if si < len(rows_per_shard) and rows_per_shard[si] != sh["samples"]:
                problems.append(f"{where(sh['path'])}: index has {rows_per_shard[si]} rows here, manifest says "
                                f"{sh['samples']} samples")
            check = _Check(where(sh["path"]), name, split, si, sh["samples"], expected, packed)
            if loc.remote:
                problems.extend(_stream_shard(Ref(where(sh["path"]), sh["sha256"], int(sh["bytes"]), sh["path"]),
                                              check, deep, loc.limits))
            else:
                problems.extend(_local_shard(loc.local(f"{name}/{sh['path']}"), sh, check, deep))
    return problems


class _Check:
    """The per-sample checks of one shard, shared by the local walk and the remote stream."""

    def __init__(self, where: str, source: str, split: str, si: int, n_samples: int, expected: Dict[str, tuple],
                 packed: Optional[Packing]):
        self.where, self.source, self.split, self.si, self.n_samples = where, source, split, si, n_samples
        self.expected, self.packed = expected, packed

    def members(self, members: Members, labels: Dict[str, object]) -> List[str]:
        out: List[str] = []
        where = self.where
        if len(members) != self.n_samples:
            out.append(f"{where}: {len(members)} samples, manifest says {self.n_samples}")
        data_exts = (BLOCK_EXT,) if self.packed else IMAGE_EXTS
        parse = parse_block_key if self.packed else parse_key
        for key, m in members.items():
            try:
                src, sp, c, j = parse(key)
            except ValueError:
                out.append(f"{where}: unexpected member key {key!r}")
                continue
            data = [e for e in data_exts if e in m]
            if src != self.source or sp != self.split or len(data) != 1 or "cls" not in m or "json" not in m:
                out.append(f"{where}: sample {key} is incomplete or misplaced (members {sorted(m)})")
                continue
            label = labels.get(key)
            if isinstance(label, bytes):
                out.append(f"{where}: {key}.cls holds {label[:20]!r}")
            elif label is not None and label != c:
                out.append(f"{where}: {key}.cls says class {label}")
            want = self.expected.get(f"{self.si}/{c}/{j}")
            got = m[data[0]]
            if want is None:
                out.append(f"{where}: sample {key} is not in the index")
            elif want[1] != got[1] or (got[0] is not None and want[0] != got[0]):
                out.append(f"{where}: index locates {key} at {want}, tar has {got if got[0] is not None else got[1:]}")
            if len(out) > 20:
                out.append(f"{where}: ... (stopping after 20 problems)")
                break
        return out


def _label(raw: bytes) -> object:
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return bytes(raw)


def _local_shard(p: Path, sh: dict, check: _Check, deep: bool) -> List[str]:
    if not p.is_file():
        return [f"{p}: shard missing"]
    if p.stat().st_size != sh["bytes"]:
        return [f"{p}: size {p.stat().st_size} != manifest {sh['bytes']}"]
    out = []
    if sha256_file(p) != sh["sha256"]:
        out.append(f"{p}: sha256 mismatch (corrupted shard)")
    if not deep:
        return out
    members: Members = defaultdict(dict)
    labels: Dict[str, object] = {}
    try:
        with open(p, "rb") as f:
            for h, data_off in iter_members(f):
                key, ext = split_name(h.name)
                members[key][ext] = (data_off, h.size)
                if ext == "cls":
                    f.seek(data_off)
                    labels[key] = _label(f.read(h.size))
    except ValueError as exc:
        return out + [f"{p}: unreadable tar ({exc})"]
    return out + check.members(members, labels)


def _stream_shard(ref: Ref, check: _Check, deep: bool, limits) -> List[str]:
    """One remote shard through webdataset's pipeline: size and sha256, and (deep) every sample."""
    out: List[str] = []
    members: Members = {}
    labels: Dict[str, object] = {}

    def on_shard(r: Ref, problem: Optional[str]) -> None:
        if problem is not None:
            out.append(f"{r.url}: {problem}")

    try:
        for sample in shard_samples([ref], on_shard, limits=limits):
            key = sample["__key__"]
            members[key] = {k: (None, len(v)) for k, v in sample.items() if not k.startswith("__")}
            if "cls" in sample:
                labels[key] = _label(sample["cls"])
    except OSError as exc:  # a deadline or retries spent (RemoteReadError names the URL)
        return out + [" ".join(str(exc).split()) if str(exc).startswith(ref.url) else f"{ref.url}: {exc}"]
    except Exception as exc:  # tarfile.ReadError, a duplicate member, a dead reader...
        return out + [f"{ref.url}: unreadable tar ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"]
    if deep and not out:  # a shard whose bytes differ is reported once, by its checksum
        out.extend(check.members(members, labels))
    return out


def verify_root(root: Root, sources: Optional[Sequence[str]] = None, deep: bool = True) -> Dict[str, List[str]]:
    loc = _loc(root)
    names = list(sources) if sources else Catalog(loc).sources()
    return {n: verify_source(loc, n, deep) for n in names}


__all__ = ["verify_root", "verify_source"]
