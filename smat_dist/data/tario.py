"""Just enough tar to write WebDataset samples and to check a member read by byte offset.

We write members ourselves (header from ``tarfile.TarInfo``, zero mtime/owner) so that shard
bytes are a pure function of their content: re-running a conversion reproduces the same
sha256, which is what makes it resumable and idempotent. A sample is three members,
``<key>.<jpg|png>``, ``<key>.cls`` (ASCII class id) and ``<key>.json``.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

# Key naming lives in the format module; re-exported here for existing importers.
from smat_dist.data.format import BLOCK_EXT, IMAGE_EXTS, NAME_RE, parse_key, sample_key

BLOCK = 512
EOF_BLOCKS = b"\0" * (2 * BLOCK)


def padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def member_header(name: str, size: int) -> bytes:
    if len(name.encode()) >= 100:
        raise ValueError(f"member name too long for a plain ustar header: {name!r}")
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    buf = ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    assert len(buf) == BLOCK
    return buf


def member(name: str, data: bytes) -> bytes:
    return member_header(name, len(data)) + data + b"\0" * (padded(len(data)) - len(data))


@dataclass(frozen=True)
class SampleLayout:
    """Where the image bytes sit inside the encoded sample (relative to its first byte)."""

    data_offset: int
    data_size: int
    total: int


def encode_sample(key: str, ext: str, image: bytes, class_id: int, meta: dict) -> Tuple[bytes, SampleLayout]:
    if ext not in IMAGE_EXTS + (BLOCK_EXT,):
        raise ValueError(f"sample extension must be one of {IMAGE_EXTS + (BLOCK_EXT,)}, got {ext!r}")
    img = member(f"{key}.{ext}", image)
    cls = member(f"{key}.cls", str(int(class_id)).encode())
    js = member(f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    blob = img + cls + js
    return blob, SampleLayout(BLOCK, len(image), len(blob))


@dataclass(frozen=True)
class Header:
    name: str
    size: int


def parse_header(buf: bytes) -> Optional[Header]:
    """A ustar header, or None for a zero (end-of-archive) block. Raises ValueError when corrupt."""
    if len(buf) < BLOCK:
        raise ValueError(f"short tar header ({len(buf)} bytes)")
    buf = buf[:BLOCK]
    if buf == b"\0" * BLOCK:
        return None
    stored = buf[148:156].split(b"\0", 1)[0].strip()
    try:
        chk = int(stored or b"-1", 8)
    except ValueError as exc:
        raise ValueError("bad tar header checksum field") from exc
    calc = sum(buf[:148]) + 8 * 32 + sum(buf[156:])
    if chk != calc:
        raise ValueError("tar header checksum mismatch")
    name = buf[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = buf[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if buf[257:262] == b"ustar" else ""
    if prefix:
        name = prefix + "/" + name
    try:
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as exc:
        raise ValueError("bad tar size field") from exc
    return Header(name, size)


def iter_members(f) -> Iterator[Tuple[Header, int]]:
    """(header, data offset) for every member of an open binary file, sequentially."""
    pos = 0
    while True:
        f.seek(pos)
        buf = f.read(BLOCK)
        if len(buf) == 0:
            return
        if len(buf) < BLOCK:
            raise ValueError(f"truncated tar header at byte {pos}")
        h = parse_header(buf)
        if h is None:
            return
        yield h, pos + BLOCK
        pos += BLOCK + padded(h.size)


def split_name(name: str) -> Tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


__all__ = [
    "BLOCK", "EOF_BLOCKS", "IMAGE_EXTS", "Header", "SampleLayout", "encode_sample", "iter_members",
    "member", "member_header", "padded", "parse_header", "parse_key", "sample_key", "split_name", "NAME_RE",
]
