"""``smat-data`` end to end, as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def smat_data(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "smat_dist.data.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"smat-data {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bench"
    p = smat_data("synth", out, "--sources", "digits,glyphs", "--scale", "0.5", "--workers", "2", "-q")
    assert "digits: test 10c/600i" in p.stdout and "glyphs: train" in p.stdout
    return out


def test_synth_verify_info(small):
    p = smat_data("verify", small)
    assert p.stdout.split() == ["ok", "digits", "ok", "glyphs"]
    info = smat_data("info", small).stdout
    assert "glyphs" in info and "bilevel" in info and "digits" in info


def test_verify_names_the_bad_shard(small, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small, root)
    man = json.loads((root / "glyphs" / "manifest.json").read_text())
    shard = root / "glyphs" / man["splits"]["test"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x40
    shard.write_bytes(bytes(data))
    p = smat_data("verify", root, check=False)
    assert p.returncode == 1
    assert f"FAIL glyphs: {shard}: sha256 mismatch" in p.stderr and "ok   digits" in p.stdout
    shard.unlink()
    p = smat_data("episodes", root, "--source", "glyphs", "--split", "test", "-n", "2", check=False)
    assert p.returncode == 2 and f"shard missing: {shard}" in p.stderr


def test_episodes_jsonl(small, tmp_path):
    p = smat_data("episodes", small, "--source", "glyphs", "--split", "test", "-n", "6", "--seed", "0")
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [e["index"] for e in lines] == list(range(6))
    for e in lines:
        assert e["source"] == "glyphs" and e["split"] == "test" and e["seed"] == 0
        labels = {x["label"] for x in e["support"]}
        assert labels == set(range(len(e["classes"]))) == {x["label"] for x in e["query"]}
        keys = [x["key"] for x in e["support"] + e["query"]]
        assert len(set(keys)) == len(keys) and all(k.startswith("md_glyphs_test_c") for k in keys)
    assert smat_data("episodes", small, "--source", "glyphs", "--split", "test", "-n", "6").stdout == p.stdout
    fixed = smat_data("episodes", small, "--source", "digits", "-n", "3", "--set", "episode.num_ways=5",
                      "--set", "episode.num_support=1", "--set", "episode.num_query=15", "-o", tmp_path / "f.jsonl")
    assert fixed.stdout == ""
    for e in map(json.loads, (tmp_path / "f.jsonl").read_text().splitlines()):
        assert e["ways"] == 5 and e["shots"] == [1] * 5 and len(e["query"]) == 75
    bad = smat_data("episodes", small, "--source", "digits", "--set", "episode.num_ways=0", check=False)
    assert bad.returncode == 2 and "num_ways" in bad.stderr


def test_show(small, tmp_path):
    out = tmp_path / "ep.png"
    p = smat_data("show", small, "--source", "glyphs", "--split", "train", "--index", "3", "--augment", "-o", out,
                  "--set", "image_size=40")
    assert "wrote" in p.stdout
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 16 * 40 and img.height > 5 * 40
    eps = tmp_path / "e.jsonl"
    smat_data("episodes", small, "--source", "digits", "-n", "3", "-o", eps)
    p = smat_data("show", small, "--episodes", eps, "--line", "2", "-o", tmp_path / "e2.png")
    assert "digits/test episode 2" in p.stdout


def test_convert_folder_round_trip(small, tmp_path):
    smat_data("export", small, "--source", "glyphs", tmp_path / "folder")
    p = smat_data("convert", "--format", "folder", tmp_path / "folder", tmp_path / "out", "--source", "glyphs", "-q")
    assert "glyphs/train" in p.stdout
    a = json.loads((small / "glyphs" / "manifest.json").read_text())
    b = json.loads((tmp_path / "out" / "glyphs" / "manifest.json").read_text())
    assert {s: (v["classes"], v["counts"]) for s, v in a["splits"].items()} == \
           {s: (v["classes"], v["counts"]) for s, v in b["splits"].items()}
    spec_a = json.loads((small / "glyphs" / "dataset_spec.json").read_text())
    spec_b = json.loads((tmp_path / "out" / "glyphs" / "dataset_spec.json").read_text())
    assert spec_a == spec_b  # the alphabets survive the round trip through folders
    p = smat_data("convert", "--format", "folder", tmp_path / "folder", tmp_path / "out", "--source", "ood",
                  "--splits", "test=1", "-q")
    assert p.stdout.strip().startswith("ood/test: ")
    assert smat_data("verify", tmp_path / "out").returncode == 0


def test_stage_to_local_disk(small, tmp_path):
    local = tmp_path / "local"
    p = smat_data("stage", small, local, "--source", "digits")
    assert p.stdout.strip() == f"staged digits -> {local / 'digits'}"
    assert smat_data("verify", local).stdout.split() == ["ok", "digits"]
    shard = next((local / "digits" / "test").glob("*.tar"))
    shard.write_bytes(b"partial copy")
    smat_data("stage", small, local, "--source", "digits")  # repairs what does not match the manifest
    assert smat_data("verify", local).returncode == 0


def test_output_paths_under_a_file_are_one_line_exit_2(tmp_path, capsys):
    from smat_dist.data.cli import main as data_main
    from smat_dist.eval.cli import main as eval_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert data_main(["synth", str(afile / "data")]) == 2
    assert capsys.readouterr().err.strip() == (f"smat-data synth: error: {afile / 'data'}: {afile} is a file, not a "
                                               "directory (smat-data synth OUT)")
    assert eval_main(["--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path), "--out", str(afile / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"smat-eval: error: {afile / 'o'}: {afile} is a file, not a directory (--out)"
    assert not list(tmp_path.glob("**/*.tar"))
