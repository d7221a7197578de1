"""Object storage for data and runs, against a real S3-compatible server on 127.0.0.1 (moto, tools/local_s3.py):
the pyarrow-backed client, the run store (staging, upload, checkpoints read back) and the data root opener."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smat_dist import objstore
from smat_dist.runstore import RunStore, fetch_run_file, inspect
from smat_dist.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory) -> Path:
    """Two ID sources of the synthetic benchmark at a quarter scale, small shards (a few seconds)."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("synth_tiny")
    build_synth(str(root), seed=0, scale=0.25, sources=["textures", "doodles"],
                opts=WriteOptions(shard_bytes=1 << 18, tier="native", workers=1, progress=False))
    return root


def test_objects_round_trip_and_errors_name_the_uri(s3_env, tmp_path):
    base = f"s3://runs/rt-{tmp_path.name}"
    objstore.write_bytes(objstore.join(base, "a/b.txt"), b"hello")
    assert objstore.read_bytes(f"{base}/a/b.txt") == b"hello"
    assert objstore.kind(f"{base}/a/b.txt") == "file" and objstore.kind(f"{base}/a") == "dir"
    assert objstore.kind(f"{base}/nothing") == "missing"
    tree = tmp_path / "tree"
    (tree / "x").mkdir(parents=True)
    (tree / "x" / "1.bin").write_bytes(os.urandom(3000))
    (tree / "2.bin").write_bytes(b"")
    objstore.upload(tree, f"{base}/tree")
    assert objstore.sizes(f"{base}/tree") == {"x/1.bin": 3000, "2.bin": 0}
    assert objstore.children(base) == ["a", "tree"]
    objstore.download(f"{base}/tree", tmp_path / "back")
    assert (tmp_path / "back" / "x" / "1.bin").read_bytes() == (tree / "x" / "1.bin").read_bytes()
    objstore.remove(f"{base}/tree")
    assert objstore.sizes(f"{base}/tree") == {}
    with pytest.raises(FileNotFoundError, match=f"{base}/missing: not found"):
        objstore.read_bytes(f"{base}/missing")
    with pytest.raises(objstore.StorageError, match="s3://no-such-bucket/x: cannot write there: the bucket does not exist"):
        objstore.check_writable("s3://no-such-bucket/x")
    objstore.check_writable(base)
    assert objstore.kind(f"{base}/.smat-write-check") == "missing"


def test_storage_path_uri_is_never_a_local_folder(tmp_path, monkeypatch):
    """The bug this replaces: Path('s3://bucket/runs').resolve() made a local folder 's3:/bucket/runs'."""
    from smat_dist.config import RunConfig, load_config
    from smat_dist.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    cfg = load_config(RunConfig, [], ["dist.storage_path=s3://bucket/runs/", "train.run_name=r1",
                                      f"dist.staging_dir={tmp_path / 'stage'}"])
    store = cfg.run_store()
    assert (store.remote, store.uri, store.url("metrics.jsonl")) == (True, "s3://bucket/runs/r1",
                                                                     "s3://bucket/runs/r1/metrics.jsonl")
    assert store.local.parent == tmp_path / "stage" and cfg.run_dir() == store.local
    assert "s3:" not in str(store.local)
    gcs = load_config(RunConfig, [], ["dist.storage_path=gs://bucket/runs", "train.run_name=r1"]).run_store()
    assert (gcs.remote, gcs.uri) == (True, "gs://bucket/runs/r1")
    local = load_config(RunConfig, [], ["train.output_dir=out", "train.run_name=r1"]).run_store()
    assert (local.remote, local.local, local.uri) == (False, tmp_path / "out" / "r1", str(tmp_path / "out" / "r1"))
    with pytest.raises(ConfigError, match="dist.storage_path / train.output_dir 'https://host/runs'"):
        load_config(RunConfig, [], ["dist.storage_path=https://host/runs"])


def _fake_checkpoint(directory: Path, step: int) -> Path:
    """A local-engine checkpoint directory: the engine file (a small zip) and the sidecar."""
    import torch

    meta = ckpt.CheckpointMeta(tag=ckpt.tag_of(step), step=step, tasks_per_step=2, world_size=1, zero_stage=0,
                               engine="local", theta_pre="fp")
    (directory / meta.tag).mkdir(parents=True)
    torch.save({"step": step}, directory / meta.tag / "state.pt")
    meta.write(directory)
    return directory


def test_run_store_stages_locally_uploads_and_reads_checkpoints_back(s3_env, tmp_path):
    store = RunStore("s3://runs/stage-test", f"r-{tmp_path.name}", str(tmp_path / "stage"))
    store.write_text("run_config.yaml", "a: 1\n")
    assert objstore.read_bytes(store.url("run_config.yaml")) == b"a: 1\n"
    (store.local / "metrics.jsonl").write_text('{"step": 1}\n')
    store.push("metrics.jsonl", "train.log")  # a file not written yet is skipped
    assert objstore.kind(store.url("train.log")) == "missing"
    for step in (2, 4, 6):
        d = _fake_checkpoint(store.local / f"{ckpt.local_dir(store.local, step).name}{ckpt.PARTIAL_SUFFIX}", step)
        store.upload_checkpoint(d, sidecar=False)
        assert store.scan()[0] is None or step > 2  # without its sidecar an upload is not a checkpoint yet
        store.upload_checkpoint(d, sidecar=True)
    store.prune(2)
    latest, broken = store.scan()
    assert latest == store.url("checkpoint_step_00000006") and broken == []
    assert [n for n in objstore.children(store.uri) if n.startswith("checkpoint")] == \
        ["checkpoint_step_00000004", "checkpoint_step_00000006"]
    assert inspect(latest).step == 6
    # a checkpoint whose engine file is missing is reported with its URI, not resumed from
    objstore.remove(objstore.join(latest, "step_00000006/state.pt"))
    latest, broken = store.scan()
    assert latest == store.url("checkpoint_step_00000004")
    assert broken == [(store.url("checkpoint_step_00000006"),
                       f"{store.url('checkpoint_step_00000006')}/step_00000006/state.pt: missing (the checkpoint "
                       f"of step 6 is incomplete)")]
    # another node (a fresh staging dir) resumes from the bucket alone
    other = RunStore("s3://runs/stage-test", store.run_name, str(tmp_path / "other"))
    point = other.resume_point(None)
    local = other.fetch(point)
    assert local.parent.parent == other.local and ckpt.inspect(local).step == 4
    other.pull("metrics.jsonl", "train.log")
    assert (other.local / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (other.local / "train.log").exists()
    # readers: smat-eval fetches a run's file
    assert fetch_run_file(store.uri, "run_config.yaml", tmp_path / "cache").read_text() == "a: 1\n"


def test_s3_data_root_reads_through_pyarrow_not_a_cli(s3_env, synth_tiny, tmp_path):
    """A dataset uploaded to s3:// and staged back is byte-identical; no `aws` executable is involved."""
    from smat_dist.data import location
    from smat_dist.data.transfer import stage, upload

    root = f"s3://data/tiny-{tmp_path.name}"
    uploaded = upload(synth_tiny, root)
    assert uploaded and all(n > 2 for _, n in uploaded)
    assert location.openers().gopen_schemes["s3"] is location._gopen_object_store
    assert location.openers().gopen_schemes["gs"] is location._gopen_object_store  # not webdataset's gsutil
    env_path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)  # no CLI can be found
    try:
        names = stage(root, tmp_path / "staged")
    finally:
        os.environ["PATH"] = env_path
    assert names == [n for n, _ in uploaded]
    for f in synth_tiny.rglob("*"):
        if f.is_file() and f.name != "sources.json":
            assert (tmp_path / "staged" / f.relative_to(synth_tiny)).read_bytes() == f.read_bytes(), f


def _smat_train(args, env, cwd, module="smat_dist.train.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


@pytest.mark.parametrize("case", ["no-bucket", "relative-under-cluster", "unreachable"])
def test_preflight_refuses_storage_a_cluster_run_cannot_use(case, s3_server, tmp_path):
    """One line, exit 2, before Ray starts: a bucket that does not exist, a relative run location under
    RAY_ADDRESS, an endpoint nobody answers."""
    env = _env(**s3_server.env())
    args = ["--config", str(REPO / "configs" / "smat.yaml"), "data.episodes=toy", "train.max_steps=1", "train.run_name=p"]
    if case == "no-bucket":
        args += ["dist.storage_path=s3://no-such-bucket/runs"]
        want = "s3://no-such-bucket/runs/p: cannot write there: the bucket does not exist"
    elif case == "relative-under-cluster":
        env["RAY_ADDRESS"] = "127.0.0.1:1"  # never contacted: the check comes first
        args += ["train.output_dir=runs"]
        want = "train.output_dir='runs' is relative, but this run joins the cluster at RAY_ADDRESS"
    else:
        from tests.conftest import free_port

        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        args += ["dist.storage_path=s3://runs/x"]
        want = "cannot connect (check AWS_ENDPOINT_URL"
    proc = _smat_train(args, env, tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(err) == 1 and err[0].startswith("smat-train: error: ") and want in err[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir()), "nothing written locally"


def test_single_process_run_in_object_storage_resumes_by_name_from_another_node(s3_env, s3_server, synth_tiny,
                                                                                tmp_path):
    """python -m smat_dist.train with s3:// data and dist.storage_path=s3://: the run (config, metrics, log,
    checkpoints, export) is in the bucket; re-run with the same name from an empty staging dir (a new node)
    it resumes at its last checkpoint, and metrics.jsonl holds every step once."""
    from smat_dist.data.transfer import upload

    data = f"s3://data/run-{tmp_path.name}"
    upload(synth_tiny, data)
    runs = f"s3://runs/single-{tmp_path.name}"
    args = ["--config", str(REPO / "configs" / "smat.yaml"), "model.backbone.name=vit_tiny_patch16_224",
            "model.backbone.patch_size=8", "model.backbone.embed_dim=32", "model.backbone.depth=1",
            "model.backbone.num_heads=2", "model.backbone.pretrained=false", "model.backbone.img_size=32",
            "model.optim.warmup_epochs=0", f"data.root={data}", "data.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}", "data.episode.num_ways=3", "data.episode.num_support=1",
            "data.episode.num_query=1", "train.tasks_per_step=2", "train.checkpoint_every=2",
            f"dist.storage_path={runs}", "train.run_name=r"]
    env = _env(**s3_server.env())
    first = _smat_train([*args, "train.max_steps=2", f"dist.staging_dir={tmp_path / 'node1'}"], env, tmp_path,
                        "smat_dist.train")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"run directory {runs}/r" in first.stdout
    second = _smat_train([*args, "train.max_steps=4", f"dist.staging_dir={tmp_path / 'node2'}"], env, tmp_path,
                         "smat_dist.train")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {tmp_path / 'node2'}" in second.stdout and "at step 2/4" in second.stdout
    have = objstore.sizes(f"{runs}/r")
    assert {"run_config.yaml", "metrics.jsonl", "train.log", "model.safetensors",
            "checkpoint_step_00000004/smat_checkpoint.json"} <= set(have)
    rows = [json.loads(ln) for ln in objstore.read_bytes(f"{runs}/r/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "resumed from" in objstore.read_bytes(f"{runs}/r/train.log").decode()
    assert not list(tmp_path.glob("s3*")), "nothing under a local folder named after the URL"


def test_local_s3_command_prints_the_env_and_stops_by_process_group(tmp_path):
    """tools/local_s3.py as the cluster scripts use it: start prints the variables, the bucket exists, stop ends it."""
    pid_file = tmp_path / "s3.pid"
    tool = str(REPO / "tools" / "local_s3.py")
    out = subprocess.run([sys.executable, tool, "start", "--bucket", "bkt", "--pid-file", str(pid_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines())
    pid = int(pid_file.read_text())
    try:
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:") and os.getpgid(pid) == pid
        probe = "from smat_dist import objstore; objstore.check_writable('s3://bkt/x'); print('ok')"
        ok = subprocess.run([sys.executable, "-c", probe], env=_env(**env), capture_output=True, text=True, timeout=60)
        assert ok.stdout.strip() == "ok", ok.stderr
    finally:
        stop = subprocess.run([sys.executable, tool, "stop", "--pid-file", str(pid_file)], timeout=60)
    assert stop.returncode == 0 and not pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
