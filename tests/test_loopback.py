"""A local run's listeners stay on loopback: torch's rendezvous store (which torch itself binds to every
interface) and gloo, checked with ``ss`` on the processes involved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from .train.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")

GROUP = textwrap.dedent("""
    import os, socket, subprocess, sys
    import torch.distributed as dist
    if sys.argv[1] == "patched":
        from smat_dist import loopback
        loopback.local_gloo()
        loopback.bind_store_to_loopback()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    dist.barrier()
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    print("\\n".join(line.split()[3] for line in out.splitlines() if f"pid={os.getpid()}," in line))
    dist.destroy_process_group()
""")


def listeners(mode: str) -> list:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("GLOO_SOCKET_IFNAME", None)
    r = subprocess.run([sys.executable, "-c", GROUP, mode], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_the_rendezvous_store_of_a_loopback_master_listens_on_loopback_only():
    before = listeners("plain")
    assert any(not a.startswith("127.0.0.1:") for a in before), before  # torch alone listens on '*'
    after = listeners("patched")
    assert after and all(a.startswith("127.0.0.1:") for a in after), after


def _tree(root: int) -> set:
    """``root`` and every process descended from it (Ray's own processes and its workers included)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in out} - out
        out |= new
        grew = bool(new)
    return out


@pytest.mark.timeout(300)
def test_a_local_two_worker_run_listens_on_loopback_only(tmp_path):
    import re
    import time

    from .train.conftest import TINY

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GLOO_SOCKET_IFNAME")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "smat_dist.train.cli", "--config", str(REPO / "configs" / "smat.yaml"), *TINY,
           "dist.num_workers=2", "train.tasks_per_step=2", "train.max_steps=12", f"train.output_dir={tmp_path}",
           "train.run_name=r"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = {}
    try:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                for name, pid in re.findall(r'\("([^"]+)",pid=(\d+),', line):
                    if int(pid) in pids:
                        seen.setdefault(line.split()[3], name)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]
    assert len(seen) > 3, seen  # Ray's own servers, the store, gloo
    outside = {a: n for a, n in seen.items() if not (a.startswith("127.0.0.1:") or a.startswith("[::1]:"))}
    assert not outside, outside
