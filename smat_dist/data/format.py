"""The converted-dataset format in one place: names, layouts, record types and checksums.

Writer, reader, verifier, cache and uploader all take these from here, so a change of layout is
one edit. A dataset root holds ``sources.json`` (the source list, for roots that cannot be
listed, such as URLs) and one directory per source::

    <source>/manifest.json             written last: its presence means the source is complete
    <source>/dataset_spec.json         Meta-Dataset spec (the sampler's input)
    <source>/<split>/shard-NNNNNN.tar  class-contiguous WebDataset shards
    <source>/<split>/rows.npy          row index (ROW_DTYPE), one row per tar sample
    <source>/<split>/classes.json      class id -> name, count, first/last row (for people)

A sample is ``<key>.<jpg|png>`` + ``<key>.cls`` (ASCII class id) + ``<key>.json``. Packed
splits (tiny grey images, e.g. QuickDraw) store up to ``images_per_block`` images of one class
per sample instead: ``<block key>.npy`` (uint8 ``[n, H, W]``), ``.cls`` and ``.json``; their
index has one row per block, and image ``j`` of a class is row ``j % B`` of the class's block
``j // B``. Image keys are the same in both layouts, so episodes name images identically.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import BinaryIO, Tuple

import numpy as np

FORMAT = "smat-dist-wds"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCES_FILE = "sources.json"  # {"format", "version", "sources": [names]}
SPEC_FILE = "dataset_spec.json"
SHARD_PATTERN = "{split}/shard-{index:06d}.tar"
INDEX_PATTERN = "{split}/rows.npy"
CLASSES_PATTERN = "{split}/classes.json"
# One record per tar sample. A plain .npy so readers can memory-map it: every actor on a node
# then shares one page-cached copy.
ROW_DTYPE = np.dtype([("shard", "<u2"), ("offset", "<u8"), ("size", "<u4")])

IMAGE_EXTS = ("jpg", "png")
BLOCK_EXT = "npy"  # packed samples
KEY_RE = re.compile(r"^md_(?P<source>[A-Za-z0-9_-]+)_(?P<split>train|valid|test)_c(?P<cls>\d+)_i(?P<idx>\d+)$")
BLOCK_KEY_RE = re.compile(r"^md_(?P<source>[A-Za-z0-9_-]+)_(?P<split>train|valid|test)_c(?P<cls>\d+)_b(?P<idx>\d+)$")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Paths a manifest may name (relative, no '..'): they are substituted into URLs and pipe: commands.
REL_PATH_RE = re.compile(r"^(?!.*(^|/)\.\.(/|$))[A-Za-z0-9_][A-Za-z0-9_./-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")  # how manifests record checksums (cache entries are named by them)


class DataError(RuntimeError):
    """Dataset files missing or inconsistent with their manifest; the message names the file or URL.
    (Also importable as ``smat_dist.data.store.DataError`` and ``smat_dist.data.DataError``.)"""


def sample_key(source: str, split: str, class_id: int, index_in_class: int) -> str:
    """``md_<source>_<split>_c<class>_i<index within class>``: no dots (WebDataset splits there)."""
    return f"md_{source}_{split}_c{class_id:05d}_i{index_in_class:08d}"


def block_key(source: str, split: str, class_id: int, block: int) -> str:
    """Key of block ``block`` of a class in a packed split."""
    return f"md_{source}_{split}_c{class_id:05d}_b{block:06d}"


def parse_key(key: str) -> Tuple[str, str, int, int]:
    m = KEY_RE.match(key)
    if not m:
        raise ValueError(f"not a sample key of this format: {key!r}")
    return m["source"], m["split"], int(m["cls"]), int(m["idx"])


def parse_block_key(key: str) -> Tuple[str, str, int, int]:
    m = BLOCK_KEY_RE.match(key)
    if not m:
        raise ValueError(f"not a block key of this format: {key!r}")
    return m["source"], m["split"], int(m["cls"]), int(m["idx"])


def check_rel_path(rel: str, origin: str) -> str:
    """``rel`` if it is a safe relative path, else ValueError naming ``origin``."""
    if not REL_PATH_RE.match(rel):
        raise ValueError(f"{origin}: unsafe or malformed relative path {rel!r}")
    return rel


def check_manifest(man: object, where: str) -> dict:
    """``man`` if every name and checksum in it is safe to build a path, URL or cache entry from;
    else :class:`DataError` naming ``where`` (the manifest) and the field. Readers call this
    before using a manifest, so a hostile one cannot point outside its root or the cache."""

    def bad(field: str, why: str, value: object) -> None:
        raise DataError(f"{where}: field {field}: {why} (got {str(value)[:80]!r}); refused")

    def rel(field: str, value: object) -> None:
        if not isinstance(value, str) or not REL_PATH_RE.match(value):
            bad(field, "not a relative path inside the source (no '..', no leading '/', no '\\')", value)

    def record(field: str, rec: object) -> None:
        if not isinstance(rec, dict):
            bad(field, "not an object", rec)
        rel(f"{field}.path", rec.get("path"))
        if not isinstance(rec.get("sha256"), str) or not SHA256_RE.match(rec["sha256"]):
            bad(f"{field}.sha256", "not 64 lowercase hex digits", rec.get("sha256"))
        n = rec.get("bytes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            bad(f"{field}.bytes", "not a byte count", n)

    if not isinstance(man, dict):
        bad("(top level)", "not a JSON object", man)
    rel("spec", man.get("spec", SPEC_FILE))
    splits = man.get("splits")
    if not isinstance(splits, dict):
        bad("splits", "not an object", splits)
    for split, sp in splits.items():
        if not NAME_RE.match(str(split)):
            bad(f"splits.{split}", "not a split name", split)
        if not isinstance(sp, dict):
            bad(f"splits.{split}", "not an object", sp)
        record(f"splits.{split}.index", sp.get("index"))
        shards = sp.get("shards")
        if not isinstance(shards, list):
            bad(f"splits.{split}.shards", "not a list", shards)
        for i, sh in enumerate(shards):
            record(f"splits.{split}.shards[{i}]", sh)
    return man


def sha256_stream(f: BinaryIO, bufsize: int = 1 << 20) -> Tuple[str, int]:
    """(hex sha256, byte count) of everything left in ``f``."""
    h = hashlib.sha256()
    n = 0
    while True:
        b = f.read(bufsize)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, bufsize)[0]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources_doc(names) -> str:
    """The text of ``sources.json`` listing ``names`` (sorted): what URL readers list a root by."""
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "sources": sorted(names)}, indent=1) + "\n"


__all__ = [
    "BLOCK_EXT", "BLOCK_KEY_RE", "CLASSES_PATTERN", "DataError", "FORMAT", "FORMAT_VERSION", "IMAGE_EXTS", "INDEX_PATTERN",
    "KEY_RE", "MANIFEST", "NAME_RE", "REL_PATH_RE", "ROW_DTYPE", "SHA256_RE", "SHARD_PATTERN", "SOURCES_FILE",
    "SPEC_FILE", "block_key", "check_manifest", "check_rel_path", "parse_block_key", "parse_key", "sample_key", "sha256_bytes", "sources_doc", "sha256_file",
    "sha256_stream",
]
