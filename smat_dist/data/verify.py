"""Check a converted dataset against its manifests: checksums, counts, index and tar consistency.

Every problem is one line naming the file (shard, index or manifest) it was found in. A flipped
byte anywhere in a shard shows up as a sha256 mismatch; ``deep`` additionally walks each shard's
tar headers and checks every sample (image + ``.cls`` + ``.json``, class id, key) against the
row index, which localises the damage to a key.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from smat_dist.data.spec import SpecError, load_spec
from smat_dist.data.tario import IMAGE_EXTS, iter_members, parse_key, split_name
from smat_dist.data.writer import ROW_DTYPE, sha256_file


def verify_source(root: str | Path, name: str, deep: bool = True) -> List[str]:
    d = Path(root) / name
    mpath = d / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: manifest missing"]
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        return [f"{mpath}: unreadable manifest: {exc}"]
    problems: List[str] = []
    try:
        spec = load_spec(d / man.get("spec", "dataset_spec.json"))
    except SpecError as exc:
        return [str(exc)]
    for split, sp in man.get("splits", {}).items():
        counts = dict(zip(sp["classes"], sp["counts"]))
        if sorted(counts) != spec.classes(split):
            problems.append(f"{d / 'dataset_spec.json'}: split {split} classes differ from {mpath}")
        for c, n in counts.items():
            if spec.images_per_class.get(c) != n:
                problems.append(f"{d / 'dataset_spec.json'}: class {c} count {spec.images_per_class.get(c)} != manifest {n}")
                break
        ipath = d / sp["index"]["path"]
        if not ipath.is_file():
            problems.append(f"{ipath}: index missing")
            continue
        if sha256_file(ipath) != sp["index"]["sha256"]:
            problems.append(f"{ipath}: index checksum mismatch")
            continue
        rows = np.load(ipath, allow_pickle=False)
        if rows.dtype != ROW_DTYPE or rows.shape != (sum(sp["counts"]),) or sp["num_images"] != sum(sp["counts"]):
            problems.append(f"{ipath}: {rows.shape[0]} rows, manifest counts sum to {sum(sp['counts'])}")
            continue
        class_ids = np.asarray(sp["classes"], dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(sp["counts"])]).astype(np.int64)
        shard, offset, size = rows["shard"], rows["offset"], rows["size"]
        rows_per_shard = np.bincount(shard.astype(np.int64), minlength=len(sp["shards"]))
        expected: Dict[str, tuple] = {}
        if deep:
            cls_of_row = np.repeat(class_ids, np.diff(ptr))
            for r in range(len(shard)):
                c = int(cls_of_row[r])
                expected[f"{int(shard[r])}/{c}/{r - int(ptr[np.searchsorted(class_ids, c)])}"] = (int(offset[r]), int(size[r]))
        for si, sh in enumerate(sp["shards"]):
            p = d / sh["path"]
            if not p.is_file():
                problems.append(f"{p}: shard missing")
                continue
            if p.stat().st_size != sh["bytes"]:
                problems.append(f"{p}: size {p.stat().st_size} != manifest {sh['bytes']}")
                continue
            if sha256_file(p) != sh["sha256"]:
                problems.append(f"{p}: sha256 mismatch (corrupted shard)")
            if si < len(rows_per_shard) and rows_per_shard[si] != sh["samples"]:
                problems.append(f"{p}: index has {rows_per_shard[si]} rows here, manifest says {sh['samples']} samples")
            if deep:
                problems.extend(_check_tar(p, name, split, si, sh["samples"], expected))
    return problems


def _check_tar(path: Path, source: str, split: str, si: int, n_samples: int, expected: Dict[str, tuple]) -> List[str]:
    out: List[str] = []
    members: Dict[str, Dict[str, tuple]] = defaultdict(dict)
    try:
        with open(path, "rb") as f:
            for h, data_off in iter_members(f):
                key, ext = split_name(h.name)
                members[key][ext] = (data_off, h.size)
                if ext == "cls":
                    f.seek(data_off)
                    raw = f.read(h.size)
                    try:
                        members[key]["_cls"] = (int(raw.decode("ascii")), 0)
                    except ValueError:
                        out.append(f"{path}: {key}.cls holds {raw[:20]!r}")
    except ValueError as exc:
        return [f"{path}: unreadable tar ({exc})"]
    if len(members) != n_samples:
        out.append(f"{path}: {len(members)} samples, manifest says {n_samples}")
    for key, m in members.items():
        try:
            src, sp, c, j = parse_key(key)
        except ValueError:
            out.append(f"{path}: unexpected member key {key!r}")
            continue
        img = [e for e in IMAGE_EXTS if e in m]
        if src != source or sp != split or len(img) != 1 or "cls" not in m or "json" not in m:
            out.append(f"{path}: sample {key} is incomplete or misplaced (members {sorted(m)})")
            continue
        if "_cls" in m and m["_cls"][0] != c:
            out.append(f"{path}: {key}.cls says class {m['_cls'][0]}")
        want = expected.get(f"{si}/{c}/{j}")
        if want is None:
            out.append(f"{path}: sample {key} is not in the index")
        elif want != m[img[0]]:
            out.append(f"{path}: index locates {key} at {want}, tar has {m[img[0]]}")
        if len(out) > 20:
            out.append(f"{path}: ... (stopping after 20 problems)")
            break
    return out


def stage(src_root: str | Path, dest_root: str | Path, sources: Optional[Sequence[str]] = None) -> List[str]:
    """Copy converted sources to node-local storage (``DataConfig.local_root``), manifest last.

    Files already at the destination with the manifest's size and sha256 are not copied again,
    so re-staging after an interrupted copy only moves what is missing. Returns the sources copied.
    """
    import shutil

    src_root, dest_root = Path(src_root), Path(dest_root)
    names = list(sources) if sources else sorted(p.parent.name for p in src_root.glob("*/manifest.json"))
    for name in names:
        s, d = src_root / name, dest_root / name
        man = json.loads((s / "manifest.json").read_text())
        checked = {sh["path"]: sh for sp in man["splits"].values() for sh in sp["shards"]}
        checked.update({sp["index"]["path"]: sp["index"] for sp in man["splits"].values()})
        if (d / "manifest.json").exists():
            (d / "manifest.json").unlink()
        for f in sorted(s.rglob("*")):
            rel = f.relative_to(s).as_posix()
            if f.is_dir() or rel == "manifest.json" or rel.startswith(".work"):
                continue
            t = d / rel
            t.parent.mkdir(parents=True, exist_ok=True)
            rec = checked.get(rel)
            if rec and t.is_file() and t.stat().st_size == rec["bytes"] and sha256_file(t) == rec["sha256"]:
                continue
            shutil.copyfile(f, t)
        problems = _quick(d, man)
        if problems:
            raise RuntimeError("; ".join(problems))
        shutil.copyfile(s / "manifest.json", d / "manifest.json")
    return names


def _quick(d: Path, man: dict) -> List[str]:
    out = []
    for sp in man["splits"].values():
        for rec in sp["shards"] + [sp["index"]]:
            p = d / rec["path"]
            if not p.is_file() or p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
                out.append(f"{p}: staged copy does not match the manifest")
    return out


def verify_root(root: str | Path, sources: Optional[Sequence[str]] = None, deep: bool = True) -> Dict[str, List[str]]:
    root = Path(root)
    names = list(sources) if sources else sorted(p.parent.name for p in root.glob("*/manifest.json"))
    return {n: verify_source(root, n, deep) for n in names}


__all__ = ["stage", "verify_root", "verify_source"]
