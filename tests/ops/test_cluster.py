"""cluster/: every manifest parses, has what its schema requires, and runs commands the package provides."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from .conftest import REPO, base_env

CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
IMAGE_ROOT = "/home/ray/smat-dist/"  # where cluster/Dockerfile puts the checkout


def scripts() -> Dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def load_all(path: Path) -> List[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ------------------------------------------------------------------------------------------ launcher
def test_ray_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's schema + its consistency checks
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu"]["gpus"] = 4  # not a node-type field
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_ray_launcher_config_has_head_gpu_workers_pins_metrics_and_safe_defaults():
    c = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = c["available_node_types"]
    assert c["head_node_type"] == "head" and set(types) == {"head", "gpu"}
    assert re.match(r"(g\d|p\d)", types["gpu"]["node_config"]["InstanceType"]), "the worker type must have GPUs"
    assert types["gpu"]["max_workers"] >= 1
    setup = "\n".join(c["setup_commands"])
    constraints = (REPO / "tools" / "constraints.txt").read_text()
    for pin in ('"torch==2.14.1"', '"torchvision==0.29.1"'):
        assert pin in setup and pin.strip('"') in constraints
    assert setup.index("torch==2.14.1") < setup.index("-c ~/smat-dist/tools/constraints.txt")
    assert c["file_mounts"]["~/smat-dist"] == "."
    assert "~/.ray/auth_token" in c["file_mounts"], "every node needs the cluster's token"
    for cmds in (c["head_start_ray_commands"], c["worker_start_ray_commands"]):
        start = [x for x in cmds if "ray start" in x]
        assert len(start) == 1 and "--metrics-export-port=8080" in start[0]
        assert "RAY_AUTH_MODE=token" in start[0]
    head = c["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(c)


# ------------------------------------------------------------------------------------------ KubeRay
def _containers(group: dict) -> List[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict, pvc: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head must not be exposed outside the cluster"
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    groups = spec["workerGroupSpecs"]
    assert groups
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for g in [head, *groups]:
        (c,) = _containers(g)
        assert c["image"].endswith(f"smat-dist:{version}")
        assert c["resources"]["limits"] and c["resources"]["requests"]
        assert c["securityContext"]["runAsNonRoot"] is True
        assert {"containerPort": 8080, "name": "metrics"} in c["ports"]
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/mnt/shared", "/dev/shm"}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in g["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc]
        assert g["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "smat-dist"
    for g in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = _containers(g)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_kuberay_manifests_have_the_required_fields():
    (pvc,) = load_all(K8S / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    name = pvc["metadata"]["name"]
    (job,) = load_all(K8S / "rayjob-train.yaml")
    (cluster,) = load_all(K8S / "raycluster.yaml")
    assert job["apiVersion"] == cluster["apiVersion"] == "ray.io/v1"
    assert (job["kind"], cluster["kind"]) == ("RayJob", "RayCluster")
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], name)
    _check_cluster_spec(cluster["spec"], name)
    assert cluster["spec"] == spec["rayClusterSpec"], "raycluster.yaml and rayjob-train.yaml drifted apart"
    runtime = yaml.safe_load(spec["runtimeEnvYAML"])
    project = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime["env_vars"] == project["env_vars"], "the RayJob must use the project's runtime env"
    (policy,) = load_all(K8S / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "smat-dist"}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    (pm,) = load_all(K8S / "podmonitor.yaml")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for path in K8S.glob("*.yaml"):
        for doc in load_all(path):
            assert doc["kind"] not in ("Ingress", "Service"), f"{path.name}: nothing is exposed by default"
            values = set(_scalars(doc))
            assert not values & {"LoadBalancer", "NodePort"}, path.name


def _scalars(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _scalars(v)
    elif isinstance(node, list):
        for v in node:
            yield from _scalars(v)
    else:
        yield node


# ------------------------------------------------------------------------------------------ entrypoints
def manifest_commands() -> List[tuple]:
    """(where, argv) of every command a manifest runs with the package."""
    out = []
    for path in K8S.glob("rayjob*.yaml"):
        for doc in load_all(path):
            out.append((path.name, shlex.split(doc["spec"]["entrypoint"])))
    return out


def test_manifest_entrypoints_are_package_commands_with_valid_configs():
    from smat_dist.config import RunConfig, load_config

    cmds = manifest_commands()
    assert cmds
    known = scripts()
    for where, argv in cmds:
        assert argv[0] in known, f"{where}: {argv[0]} is not in [project.scripts] {sorted(known)}"
        if argv[0] == "smat-train":
            configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
            assert configs and all(c.startswith(IMAGE_ROOT) for c in configs), "configs come from the image"
            local = [REPO / c[len(IMAGE_ROOT):] for c in configs]
            overrides = [a for a in argv[1:] if "=" in a and not a.startswith("--")]
            cfg = load_config(RunConfig, local, overrides)  # every key exists and validates
            assert cfg.data.root.startswith("/mnt/shared/") and cfg.train.output_dir.startswith("/mnt/shared/")
            assert cfg.dist.use_gpu


@pytest.mark.parametrize("script", sorted(scripts()))
def test_every_console_script_answers_help(script):
    module = scripts()[script].split(":")[0]
    out = subprocess.run([sys.executable, "-m", module, "--help"], env=base_env(), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usage" in out.stdout.lower()


# ------------------------------------------------------------------------------------------ container
def test_dockerfile_pins_the_tested_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    (base,) = [ln for ln in lines if ln.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", base), "pin the base image to a patch release"
    constraints = (REPO / "tools" / "constraints.txt").read_text().split()
    torch_at = text.index('pip install "torch==2.14.1" "torchvision==0.29.1"')
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    assert torch_at < text.index("pip install -c tools/constraints.txt .")
    for ln in lines:
        if ln.startswith("COPY "):
            src = ln.split()[-2]
            assert (REPO / src).exists(), f"COPY source {src} is not in the repository"
    assert "USER ray" in lines and not any(ln.startswith("EXPOSE") for ln in lines)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", "runs", ".git"} <= set(ignore)


def test_project_runtime_env_parses_and_excludes_bulk():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv", "data", "runs", ".git"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())


# ------------------------------------------------------------------------------------------ README
def test_readme_commands_are_package_commands():
    """Every `smat-*` command the README and docs/ tell users to run (cluster recipes included) exists."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs)
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    used = set()
    for line in blocks.splitlines():
        words = line.split()
        # a command: first word of a line, or the word after `--` / `$SUBMIT` (ray job submit ... -- CMD)
        starts = [0] + [i + 1 for i, w in enumerate(words) if w in ("--", "$SUBMIT")]
        used |= {words[i] for i in starts if i < len(words) and words[i].startswith("smat-")}
    assert {"smat-train", "smat-eval", "smat-sweep", "smat-data"} <= used
    assert used <= set(scripts()), f"README/docs run commands the package does not provide: {used - set(scripts())}"


def test_job_submission_with_the_project_runtime_env(ray_head, synth_small, tmp_path):
    """`ray job submit --runtime-env cluster/runtime_env.yaml` (as docs/operations.md does) uploads this checkout as the
    working directory: the job finds configs/ and the package, and authenticates with the token."""
    ray = str(Path(sys.executable).parent / "ray")
    env = base_env(RAY_ADDRESS=ray_head.dashboard, RAY_AUTH_MODE="token")
    job = f"ops-runtime-env-{tmp_path.name[-8:]}"
    cmd = [ray, "job", "submit", "--submission-id", job, "--no-wait", "--runtime-env", "cluster/runtime_env.yaml",
           "--entrypoint-num-cpus", "0", "--", "python", "-m", "smat_dist.sweep.cli", "--config",
           "configs/sweeps/tiny.yaml", "--dry-run", "--set", f"data.root={synth_small}", "--out", str(tmp_path / "sw")]
    for _ in range(60):  # a fresh head's job agent needs a few seconds
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    status, deadline = "", time.time() + 240
    while time.time() < deadline and not any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
        time.sleep(1)
        status = subprocess.run([ray, "job", "status", job], env=env, capture_output=True, text=True,
                                timeout=60).stdout
    logs = subprocess.run([ray, "job", "logs", job], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "succeeded" in status.lower(), status + logs[-4000:]
    assert "4 cells" in logs
    uploaded = re.search(r"--config (\S+/configs/demo/smat\.yaml)", logs)
    assert uploaded and not uploaded.group(1).startswith(str(REPO)), "the job must run in the uploaded working dir"
