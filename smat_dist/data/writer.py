"""Write one source as class-contiguous WebDataset shards + row index + manifest.

Every input format (MD TFRecords, PMF h5, image folders, the synthetic generator) is an
:class:`InputSource` that lists its classes and yields the images of one class. Conversion
runs in three resumable phases under ``<out>/<source>/.work``:

1. **fragments**, parallel over classes (spawned worker processes): each class becomes a run
   of tar members (``.work/frag/cNNNNN.tar`` + ``.json`` sidecar), images in a seeded random
   order within the class (a source recorded in a meaningful order, such as traffic-sign
   sequences, must not leak it into episodes). A finished sidecar means a finished class;
   re-runs skip it. With ``pack=B`` (tiny grey images, e.g. QuickDraw) a class is a run of
   samples that each hold up to B images as one ``.npy`` (same seeded order).
2. **shards**: per split, fragments are concatenated in class-id order into
   ``<split>/shard-NNNNNN.tar``; a new shard starts when the next class would overflow the
   target size, and a class bigger than the target continues into the next shard. A shard whose
   file already holds the planned bytes (same plan digest, size and sha256) is not rewritten.
3. **index + manifest**: ``<split>/rows.npy`` (per tar sample: shard, byte offset and size of the
   image or block member; rows are class-contiguous in the manifest's class order, so the
   manifest's counts are the CSR pointers), ``<split>/classes.json``, ``dataset_spec.json`` (MD
   layout, measured counts) and finally ``manifest.json``, written last and atomically: its
   presence means the source is complete. ``<out_root>/sources.json`` is then rewritten to list
   every complete source (URL roots cannot be listed otherwise).

Output is local only: write to a directory, then ``smat-data upload`` it to object storage (the
resumable phases need a filesystem; the upload goes through webdataset's writers).

Member bytes are deterministic (fixed tar header fields, seeded order), so a re-run after a
crash, or a full rebuild, produces byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from smat_dist.data.format import (BLOCK_EXT, CLASSES_PATTERN, FORMAT, FORMAT_VERSION, INDEX_PATTERN, MANIFEST,
                                   ROW_DTYPE, SHARD_PATTERN, SOURCES_FILE, block_key, sha256_file,
                                   sources_doc)
from smat_dist.data.location import is_url
from smat_dist.data.spec import SPLITS, SourceSpec, save_spec, with_counts
from smat_dist.data.tario import EOF_BLOCKS, NAME_RE, encode_sample, sample_key
from smat_dist.fsutil import atomic_write_text, publish

log = logging.getLogger(__name__)
PACK_GREY_TOLERANCE = 8  # max channel spread (JPEG rounding) of an RGB image accepted as grey when packing


class ConvertError(RuntimeError):
    """Input that cannot be converted; the message names the file."""


@dataclass(frozen=True)
class ClassEntry:
    class_id: int
    name: str
    split: str


class InputSource:
    """One source to convert. Must pickle cheaply: spawned workers call :meth:`read_class`."""

    name: str = ""
    fmt: str = ""

    def entries(self) -> List[ClassEntry]:
        raise NotImplementedError

    def spec(self) -> SourceSpec:
        """The MD spec (structure); image counts are replaced by the measured ones."""
        raise NotImplementedError

    def read_class(self, entry: ClassEntry) -> Iterator[Tuple[Any, dict]]:
        """Yield ``(payload, meta)``: payload is encoded image bytes or an HxWx3 uint8 array."""
        raise NotImplementedError

    def origin(self) -> dict:
        return {"format": self.fmt}


@dataclass
class WriteOptions:
    shard_bytes: int = 512 * 1024 * 1024  # target shard size
    workers: int = 1
    # s256: shorter side > max_side is resized to max_side and re-encoded; others keep their bytes.
    # native: bytes are copied unchanged (non JPEG/PNG inputs are still re-encoded).
    tier: str = "s256"
    max_side: int = 256
    jpeg_quality: int = 95
    raw_format: str = "png"  # how decoded pixel inputs (PMF h5) are encoded: png (lossless) | jpg
    shuffle_seed: int = 23  # within-class order
    decode_check: bool = False  # fully decode every input image (slow); default: header only
    # Packed blocks: >0 stores up to this many images of a class per tar sample, as one uint8
    # [n, pack_side, pack_side] .npy (grey images of that size only; QuickDraw: 1024 and 28).
    pack: int = 0
    pack_side: int = 28
    keep_work: bool = False
    force: bool = False
    progress: bool = True

    def fingerprint(self) -> dict:
        d = asdict(self)
        for k in ("workers", "keep_work", "force", "progress"):
            d.pop(k)
        return d


# ---------------------------------------------------------------- phase 1: one class


def _encode(payload: Any, opts: WriteOptions) -> Tuple[bytes, str, int, int]:
    from PIL import Image

    if isinstance(payload, np.ndarray):
        arr = payload
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"pixel array must be uint8 HxW[x3], got {arr.dtype} {arr.shape}")
        img = Image.fromarray(arr)
        return _save(img, opts.raw_format, opts), opts.raw_format, img.width, img.height
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"unsupported payload type {type(payload).__name__}")
    data = bytes(payload)
    img = Image.open(io.BytesIO(data))
    fmt = (img.format or "").upper()
    w, h = img.size
    if opts.decode_check:
        img.load()
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt)
    too_big = opts.tier == "s256" and min(w, h) > opts.max_side
    if ext is not None and not too_big:
        return data, ext, w, h
    out_ext = "jpg" if fmt == "JPEG" else "png"  # lossless inputs stay lossless
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if too_big:
        s = opts.max_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    return _save(img, out_ext, opts), out_ext, img.width, img.height


def _grey(payload: Any, side: int) -> np.ndarray:
    """A packed-block image: grey uint8 ``side x side`` (RGB accepted when its channels agree)."""
    from PIL import Image

    if isinstance(payload, np.ndarray):
        arr = payload
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(payload)))
        arr = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    else:
        raise TypeError(f"unsupported payload type {type(payload).__name__}")
    if arr.dtype != np.uint8:
        raise ValueError(f"pixel array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3:
        c = arr[:, :, :3].astype(np.int16)
        spread = int((c.max(axis=2) - c.min(axis=2)).max(initial=0))
        if spread > PACK_GREY_TOLERANCE:
            raise ValueError(f"not a grey image (channels differ by up to {spread}); packing needs grey images")
        arr = np.round(c.mean(axis=2)).astype(np.uint8)
    if arr.shape != (side, side):
        raise ValueError(f"image is {arr.shape[1] if arr.ndim > 1 else '?'}x{arr.shape[0]}, packed blocks hold "
                         f"{side}x{side}")
    return np.ascontiguousarray(arr)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _save(img, ext: str, opts: WriteOptions) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=opts.jpeg_quality)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _frag_paths(work: Path, class_id: int) -> Tuple[Path, Path]:
    d = work / "frag"
    return d / f"c{class_id:05d}.tar", d / f"c{class_id:05d}.json"


def convert_class(src: InputSource, entry: ClassEntry, work: str, opts: WriteOptions) -> dict:
    """Phase 1 for one class (runs in a worker). Returns the sidecar dict."""
    tar_path, side_path = _frag_paths(Path(work), entry.class_id)
    if side_path.exists():
        return json.loads(side_path.read_text())
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    items: List[Tuple[Any, str, int, int, dict]] = []
    skipped: List[str] = []
    for payload, meta in src.read_class(entry):
        if isinstance(payload, Exception):  # the input reader already knows this one is bad
            skipped.append(f"{meta.get('ref', '?')}: {payload}")
            continue
        try:
            if opts.pack:
                arr = _grey(payload, opts.pack_side)
                items.append((arr, BLOCK_EXT, opts.pack_side, opts.pack_side, meta))
                continue
            data, ext, w, h = _encode(payload, opts)
        except Exception as exc:  # a bad input image is skipped, named, and counted
            skipped.append(f"{meta.get('ref', '?')}: {type(exc).__name__}: {exc}")
            continue
        items.append((data, ext, w, h, meta))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(opts.shuffle_seed, spawn_key=(entry.class_id,))))
    order = rng.permutation(len(items))
    samples = []
    tmp = tar_path.with_suffix(".tmp")
    pos = 0
    with open(tmp, "wb") as f:
        for b in range(0, len(order), opts.pack) if opts.pack else ():
            block = [int(i) for i in order[b:b + opts.pack]]
            key = block_key(src.name, entry.split, entry.class_id, b // opts.pack)
            md = {"source": src.name, "split": entry.split, "class": entry.class_id, "class_name": entry.name,
                  "first": b, "n": len(block), "height": opts.pack_side, "width": opts.pack_side,
                  "orig_index": block, "orig": [items[i][4].get("ref") for i in block]}
            blob, lay = encode_sample(key, BLOCK_EXT, _npy(np.stack([items[i][0] for i in block])),
                                      entry.class_id, md)
            f.write(blob)
            samples.append([pos, pos + lay.data_offset, lay.data_size, pos + lay.total])
            pos += lay.total
        for j, i in enumerate(order if not opts.pack else ()):
            data, ext, w, h, meta = items[int(i)]
            key = sample_key(src.name, entry.split, entry.class_id, j)
            md = {"source": src.name, "split": entry.split, "class": entry.class_id, "class_name": entry.name,
                  "width": w, "height": h, "orig_index": int(i), **{k: v for k, v in meta.items() if k != "ref"}}
            if "ref" in meta:
                md["orig"] = meta["ref"]
            blob, lay = encode_sample(key, ext, data, entry.class_id, md)
            f.write(blob)
            samples.append([pos, pos + lay.data_offset, lay.data_size, pos + lay.total])
            pos += lay.total
    os.replace(tmp, tar_path)
    side = {"class": entry.class_id, "split": entry.split, "name": entry.name, "n": len(items),
            "bytes": pos, "samples": samples, "skipped": skipped}
    tmp_side = side_path.with_suffix(".tmpjson")
    tmp_side.write_text(json.dumps(side))
    os.replace(tmp_side, side_path)
    return side


def _worker(args) -> Tuple[int, int, int]:
    src, entry, work, opts = args
    side = convert_class(src, entry, work, opts)
    return entry.class_id, side["n"], len(side["skipped"])


# ---------------------------------------------------------------- phase 2: shards


@dataclass
class _Shard:
    index: int
    segments: List[Tuple[int, int, int, int]] = field(default_factory=list)  # (class, j0, j1, nbytes)
    nbytes: int = 0


def plan_shards(sides: Sequence[dict], target: int) -> List[_Shard]:
    """Greedy class-contiguous packing (see module docstring)."""
    shards: List[_Shard] = [_Shard(0)]

    def cur() -> _Shard:
        return shards[-1]

    for side in sides:
        if not side["samples"]:
            continue
        if cur().nbytes > 0 and cur().nbytes + side["bytes"] > target:
            shards.append(_Shard(len(shards)))
        j0 = 0
        run = 0
        for j, (start, _d, _s, end) in enumerate(side["samples"]):
            size = end - start
            if cur().nbytes + run > 0 and cur().nbytes + run + size > target and side["bytes"] > target:
                if j > j0:
                    cur().segments.append((side["class"], j0, j, run))
                    cur().nbytes += run
                shards.append(_Shard(len(shards)))
                j0, run = j, 0
            run += size
        cur().segments.append((side["class"], j0, len(side["samples"]), run))
        cur().nbytes += run
    return [s for s in shards if s.segments]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _write_shard(path: Path, shard: _Shard, side_by_class: Dict[int, dict], work: Path) -> Tuple[str, int]:
    h = hashlib.sha256()
    tmp = path.with_suffix(".tar.tmp")
    total = 0
    with open(tmp, "wb") as out:
        for cls, j0, j1, _ in shard.segments:
            side = side_by_class[cls]
            start, end = side["samples"][j0][0], side["samples"][j1 - 1][3]
            frag, _ = _frag_paths(work, cls)
            with open(frag, "rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    b = f.read(min(left, 1 << 22))
                    if not b:
                        raise ConvertError(f"{frag}: fragment shorter than its sidecar says")
                    out.write(b)
                    h.update(b)
                    left -= len(b)
                    total += len(b)
        out.write(EOF_BLOCKS)
        h.update(EOF_BLOCKS)
        total += len(EOF_BLOCKS)
    publish(tmp, path)  # synced before the manifest that lists it
    return h.hexdigest(), total


# ---------------------------------------------------------------- driver


def _progress(iterable, total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, unit="class", dynamic_ncols=True)


def manifest_complete(out: Path) -> bool:
    """True when ``manifest.json`` exists and every shard it lists has its recorded size."""
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return False
    try:
        man = json.loads(mpath.read_text())
        for sp in man["splits"].values():
            for sh in sp["shards"]:
                p = out / sh["path"]
                if not p.is_file() or p.stat().st_size != sh["bytes"]:
                    return False
            ip = out / sp["index"]["path"]
            if not ip.is_file() or ip.stat().st_size != sp["index"]["bytes"]:
                return False
    except (KeyError, ValueError, TypeError):
        return False
    return True


@dataclass
class _Job:
    src: InputSource
    out: Path
    work: Path
    entries: List[ClassEntry]
    old_manifest: Optional[dict]
    t0: float


def _prepare(src: InputSource, out_root: str | Path, opts: WriteOptions) -> Optional[_Job]:
    if not NAME_RE.match(src.name):
        raise ConvertError(f"source name {src.name!r} must match [A-Za-z0-9_-]+ (no dots: WebDataset keys)")
    if opts.tier not in ("s256", "native"):
        raise ConvertError(f"tier must be s256 or native, got {opts.tier!r}")
    if opts.pack < 0 or opts.pack_side < 1:
        raise ConvertError(f"pack must be >= 0 and pack_side >= 1, got {opts.pack}, {opts.pack_side}")

    if is_url(out_root):
        raise ConvertError(f"{out_root}: converters write to a local directory (resumable phases need a "
                           "filesystem); convert there, then `smat-data upload LOCAL_ROOT URL`")
    out = Path(out_root) / src.name
    mpath = out / "manifest.json"
    if not opts.force and manifest_complete(out):
        log.info("%s: already converted (%s); use --force to rebuild", src.name, mpath)
        return None
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    fp = {"options": opts.fingerprint(), "origin": src.origin(), "name": src.name}
    fp_path = work / "options.json"
    if work.exists() and (opts.force or not fp_path.is_file() or json.loads(fp_path.read_text()) != fp):
        shutil.rmtree(work)
    (work / "frag").mkdir(parents=True, exist_ok=True)
    fp_path.write_text(json.dumps(fp, sort_keys=True))
    old_manifest = json.loads(mpath.read_text()) if mpath.is_file() and not opts.force else None
    if mpath.exists():
        mpath.unlink()  # the source is incomplete until the new manifest lands
    entries = src.entries()
    if not entries:
        raise ConvertError(f"{src.name}: the input has no classes")
    ids = [e.class_id for e in entries]
    if sorted(ids) != list(range(len(ids))):
        raise ConvertError(f"{src.name}: class ids must be 0..{len(ids) - 1}")
    return _Job(src, out, work, entries, old_manifest, t0)


def _run_fragments(jobs: Sequence[_Job], opts: WriteOptions) -> None:
    """Phase 1 for every class of every job, in one pool of spawned workers."""
    total = sum(len(j.entries) for j in jobs)
    todo = [(j.src, e, str(j.work), opts) for j in jobs for e in j.entries
            if not _frag_paths(j.work, e.class_id)[1].exists()]
    if not todo:
        return
    desc = ",".join(j.src.name for j in jobs)
    desc = desc if len(desc) < 40 else f"{len(jobs)} sources"
    if opts.workers > 1 and len(todo) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(opts.workers, len(todo))) as pool:
            for _ in _progress(pool.imap_unordered(_worker, todo, chunksize=1), total, desc, opts.progress,
                               total - len(todo)):
                pass
    else:
        for _ in _progress(map(_worker, todo), total, desc, opts.progress, total - len(todo)):
            pass


def write_sources_index(root: str | Path) -> Path:
    """``<root>/sources.json``: every source of ``root`` with a manifest (what URL readers list).
    Rewritten under a lock from what is on disk, so concurrent conversions never drop a source."""
    import fcntl

    root = Path(root)
    path = root / SOURCES_FILE
    fd = os.open(root / ".sources.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        names = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))
        atomic_write_text(path, sources_doc(names))
    finally:
        os.close(fd)
    return path


def build_source(src: InputSource, out_root: str | Path, opts: Optional[WriteOptions] = None) -> Path:
    """Convert ``src`` into ``<out_root>/<src.name>/``; returns the manifest path."""
    return build_sources([src], out_root, opts)[0]


def build_sources(srcs: Sequence[InputSource], out_root: str | Path, opts: Optional[WriteOptions] = None) -> List[Path]:
    """Convert several sources, sharing one worker pool for their classes."""
    opts = opts or WriteOptions()
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ConvertError(f"duplicate source names in {names}")
    jobs = [_prepare(s, out_root, opts) for s in srcs]
    _run_fragments([j for j in jobs if j is not None], opts)
    out = [Path(out_root) / s.name / MANIFEST if j is None else _finalize(j, opts) for s, j in zip(srcs, jobs)]
    write_sources_index(out_root)
    return out


def _finalize(job: _Job, opts: WriteOptions) -> Path:
    """Phases 2 and 3 for one source whose fragments are all written."""
    src, out, work, entries, old_manifest, t0 = job.src, job.out, job.work, job.entries, job.old_manifest, job.t0
    mpath = out / "manifest.json"
    sides = {e.class_id: json.loads(_frag_paths(work, e.class_id)[1].read_text()) for e in entries}
    skipped = [s for side in sides.values() for s in side["skipped"]]
    for s in skipped[:20]:
        log.warning("%s: skipped unreadable input %s", src.name, s)
    if len(skipped) > 20:
        log.warning("%s: ... %d unreadable inputs skipped in total", src.name, len(skipped))

    spec_in = src.spec()
    counts = {cid: side["n"] for cid, side in sides.items()}
    mismatched = [c for c in counts if spec_in.images_per_class.get(c, counts[c]) != counts[c]]
    if mismatched:
        c = mismatched[0]
        log.warning("%s: %d classes hold a different number of images than the input spec (class %d: spec %d, found %d)",
                    src.name, len(mismatched), c, spec_in.images_per_class.get(c), counts[c])
    spec = with_counts(spec_in, counts)

    old_shards = {}
    if old_manifest:
        for sp in old_manifest.get("splits", {}).values():
            for sh in sp.get("shards", []):
                old_shards[sh["path"]] = sh
    manifest: Dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "source": src.name, "spec": "dataset_spec.json",
        "spec_kind": spec.kind, "origin": src.origin(), "options": opts.fingerprint(),
        "skipped_inputs": len(skipped), "splits": {},
    }
    for split in SPLITS:
        split_ids = [e.class_id for e in entries if e.split == split]
        if sorted(split_ids) != spec.classes(split):
            raise ConvertError(f"{src.name}: split {split} has classes {split_ids[:5]}... but the spec says "
                               f"{spec.classes(split)[:5]}...")
        if not split_ids:
            continue
        (out / split).mkdir(exist_ok=True)
        split_sides = [sides[c] for c in sorted(split_ids)]
        plan = plan_shards(split_sides, opts.shard_bytes)
        if len(plan) > np.iinfo(np.uint16).max:
            raise ConvertError(f"{src.name}/{split}: {len(plan)} shards; raise --shard-size")
        # index rows are tar samples: images, or blocks of a packed split
        sample_ptr = np.concatenate([[0], np.cumsum([len(s["samples"]) for s in split_sides])]).astype(np.int64)
        image_ptr = np.concatenate([[0], np.cumsum([s["n"] for s in split_sides])]).astype(np.int64)
        nrows = int(sample_ptr[-1])
        row_shard = np.zeros(nrows, dtype=np.uint16)
        row_offset = np.zeros(nrows, dtype=np.uint64)
        row_size = np.zeros(nrows, dtype=np.uint32)
        first_row = {s["class"]: int(sample_ptr[i]) for i, s in enumerate(split_sides)}
        shard_records = []
        for sh in plan:
            rel = SHARD_PATTERN.format(split=split, index=sh.index)
            path = out / rel
            pdigest = _digest([list(s) for s in sh.segments] + [sides[s[0]]["samples"][s[1]:s[2]] for s in sh.segments])
            marker = work / split / f"shard-{sh.index:06d}.json"
            rec = None
            if marker.is_file():
                m = json.loads(marker.read_text())
                if m.get("plan") == pdigest and path.is_file() and path.stat().st_size == m["bytes"]:
                    rec = m
            if rec is None and rel in old_shards and old_shards[rel].get("plan") == pdigest and path.is_file():
                o = old_shards[rel]
                if path.stat().st_size == o["bytes"] and sha256_file(path) == o["sha256"]:
                    rec = {"plan": pdigest, "sha256": o["sha256"], "bytes": o["bytes"]}
            if rec is None:
                sha, nbytes = _write_shard(path, sh, sides, work)
                rec = {"plan": pdigest, "sha256": sha, "bytes": nbytes}
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps(rec))
            base = 0
            nsamples = 0
            for cls, j0, j1, nb in sh.segments:
                smp = sides[cls]["samples"]
                start0 = smp[j0][0]
                for j in range(j0, j1):
                    r = first_row[cls] + j
                    row_shard[r] = sh.index
                    row_offset[r] = base + smp[j][1] - start0
                    row_size[r] = smp[j][2]
                base += nb
                nsamples += j1 - j0
            shard_records.append({"path": rel, "sha256": rec["sha256"], "bytes": rec["bytes"], "samples": nsamples,
                                  "classes": [sh.segments[0][0], sh.segments[-1][0]], "plan": pdigest})
        idx_rel = INDEX_PATTERN.format(split=split)
        idx_tmp = out / f"{split}/rows.tmp.npy"
        rows = np.zeros(nrows, dtype=ROW_DTYPE)
        rows["shard"], rows["offset"], rows["size"] = row_shard, row_offset, row_size
        np.save(idx_tmp, rows, allow_pickle=False)
        publish(idx_tmp, out / idx_rel)
        classes_doc = [{"id": s["class"], "name": s["name"], "n_images": s["n"], "first_row": int(image_ptr[i]),
                        "last_row": int(image_ptr[i]) + s["n"] - 1,
                        **({"blocks": len(s["samples"]), "first_block": first_row[s["class"]]} if opts.pack else {})}
                       for i, s in enumerate(split_sides)]
        (out / CLASSES_PATTERN.format(split=split)).write_text(json.dumps(classes_doc, indent=0) + "\n")
        manifest["splits"][split] = {
            "classes": [s["class"] for s in split_sides],
            "counts": [s["n"] for s in split_sides],
            "num_images": int(image_ptr[-1]),
            "index": {"path": idx_rel, "sha256": sha256_file(out / idx_rel), "bytes": (out / idx_rel).stat().st_size,
                      "rows": nrows},
            "shards": shard_records,
        }
        if opts.pack:
            manifest["splits"][split]["packed"] = {"images_per_block": opts.pack, "height": opts.pack_side,
                                                   "width": opts.pack_side, "dtype": "uint8"}
    save_spec(spec, out / "dataset_spec.json", file_pattern=SHARD_PATTERN, rel_path=".")
    atomic_write_text(mpath, json.dumps(manifest, indent=1) + "\n")  # last, synced: the source is complete
    if not opts.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(sp["num_images"] for sp in manifest["splits"].values())
    log.info("%s: %d images, %d shards in %.1fs -> %s", src.name, total,
             sum(len(sp["shards"]) for sp in manifest["splits"].values()), time.time() - t0, out)
    return mpath


__all__ = ["ClassEntry", "ConvertError", "InputSource", "WriteOptions", "build_source", "build_sources",
           "convert_class", "manifest_complete", "plan_shards", "write_sources_index"]
