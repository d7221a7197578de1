"""TFRecord files of ``tf.train.Example`` records, read without TensorFlow.

Framing per record (the TFRecord format): uint64 little-endian length, uint32 masked CRC-32C
of the length bytes, payload, uint32 masked CRC-32C of the payload. The payload is a protobuf
``Example { Features features = 1 }``, ``Features { map<string, Feature> feature = 1 }``,
``Feature { oneof { BytesList = 1; FloatList = 2; Int64List = 3 } }``, each list a repeated
field 1 (numbers packed or not). That is all the protobuf we need, parsed by hand below.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Tuple, Union

try:  # C implementation; present wherever the `tfrecord` package is (tests) or installed alone
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - payload CRCs are then skipped (length CRCs still checked)
    _crc32c = None

_MASK_DELTA = 0xA282EAD8
Value = Union[bytes, int, float]


class TFRecordError(ValueError):
    pass


def _crc32c_py(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = _crc32c(data) if _crc32c is not None else _crc32c_py(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str, check_crc: bool = True) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(byte offset, payload)``. A bad length CRC ends the file with an error (framing is
    lost); a bad payload CRC raises too, naming file and offset."""
    check_payload = check_crc and _crc32c is not None
    with open(path, "rb") as f:
        while True:
            off = f.tell()
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise TFRecordError(f"{path}: truncated record header at byte {off}")
            length_bytes, (lcrc,) = head[:8], struct.unpack("<I", head[8:])
            if check_crc and masked_crc(length_bytes) != lcrc:
                raise TFRecordError(f"{path}: length CRC mismatch at byte {off}")
            (length,) = struct.unpack("<Q", length_bytes)
            payload = f.read(length)
            tail = f.read(4)
            if len(payload) < length or len(tail) < 4:
                raise TFRecordError(f"{path}: truncated record at byte {off}")
            if check_payload and masked_crc(payload) != struct.unpack("<I", tail)[0]:
                raise TFRecordError(f"{path}: payload CRC mismatch in record at byte {off}")
            yield off, payload


# ---------------------------------------------------------------- protobuf wire format


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise TFRecordError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise TFRecordError("varint too long")


def _fields(buf: memoryview) -> Iterator[Tuple[int, int, Union[int, memoryview]]]:
    pos = 0
    n = len(buf)
    while pos < n:
        tag, pos = _varint(buf, pos)
        field_no, wt = tag >> 3, tag & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
            yield field_no, wt, v
        elif wt == 1:
            yield field_no, wt, buf[pos:pos + 8]
            pos += 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise TFRecordError("length-delimited field runs past the message")
            yield field_no, wt, buf[pos:pos + ln]
            pos += ln
        elif wt == 5:
            yield field_no, wt, buf[pos:pos + 4]
            pos += 4
        else:
            raise TFRecordError(f"unsupported wire type {wt}")
        if pos > n:
            raise TFRecordError("field runs past the message")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _feature(buf: memoryview) -> List[Value]:
    out: List[Value] = []
    for kind, wt, val in _fields(buf):
        if wt != 2:
            continue
        for f, wt2, item in _fields(val):  # the list message: repeated field 1
            if f != 1:
                continue
            if kind == 1 and wt2 == 2:
                out.append(bytes(item))
            elif kind == 2:
                if wt2 == 2:
                    out.extend(x for (x,) in struct.iter_unpack("<f", bytes(item)))
                elif wt2 == 5:
                    out.append(struct.unpack("<f", bytes(item))[0])
            elif kind == 3:
                if wt2 == 2:
                    p = 0
                    while p < len(item):
                        v, p = _varint(item, p)
                        out.append(_int64(v))
                elif wt2 == 0:
                    out.append(_int64(int(item)))  # type: ignore[arg-type]
    return out


def parse_example(payload: bytes) -> Dict[str, List[Value]]:
    """``tf.train.Example`` bytes -> {feature name: list of values}."""
    feats: Dict[str, List[Value]] = {}
    for f, wt, features in _fields(memoryview(payload)):
        if f != 1 or wt != 2:
            continue
        for f2, wt2, entry in _fields(features):
            if f2 != 1 or wt2 != 2:
                continue
            key, value = None, None
            for f3, wt3, v in _fields(entry):
                if f3 == 1 and wt3 == 2:
                    key = bytes(v).decode("utf-8")
                elif f3 == 2 and wt3 == 2:
                    value = _feature(v)
            if key is not None:
                feats[key] = value if value is not None else []
    return feats


__all__ = ["TFRecordError", "iter_records", "masked_crc", "parse_example"]
