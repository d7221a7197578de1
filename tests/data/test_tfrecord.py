"""TFRecord framing and tf.train.Example parsing without TensorFlow, against the `tfrecord` package."""

from __future__ import annotations

import pytest

from smat_dist.data.tfrecord import TFRecordError, iter_records, parse_example


def test_parse_records_written_by_an_independent_writer(tmp_path):
    from tfrecord.writer import TFRecordWriter

    path = tmp_path / "x.tfrecords"
    w = TFRecordWriter(str(path))
    rows = [
        {"image": (b"\xff\xd8" + bytes(range(256)) * 3, "byte"), "label": (7, "int"), "w": ([0.5, -2.25], "float")},
        {"image": (b"", "byte"), "label": (-3, "int")},
        {"image": (b"x" * 70000, "byte"), "label": (2**40 + 1, "int"), "tags": ([b"a", b"bc"], "byte")},
    ]
    for r in rows:
        w.write(r)
    w.close()
    got = [parse_example(p) for _, p in iter_records(str(path))]
    assert [g["label"] for g in got] == [[7], [-3], [2**40 + 1]]
    assert [g["image"][0] for g in got] == [r["image"][0] for r in rows]
    assert got[0]["w"] == [0.5, -2.25] and got[2]["tags"] == [b"a", b"bc"]
    offsets = [o for o, _ in iter_records(str(path))]
    assert offsets[0] == 0 and offsets[1] > offsets[0]


def test_damaged_records_are_errors(tmp_path):
    from tfrecord.writer import TFRecordWriter

    path = tmp_path / "x.tfrecords"
    w = TFRecordWriter(str(path))
    w.write({"image": (b"abcdef" * 100, "byte"), "label": (1, "int")})
    w.close()
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the payload
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match="payload CRC"):
        list(iter_records(str(path)))
    data[40] ^= 0xFF
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(TFRecordError, match="truncated"):
        list(iter_records(str(path)))
