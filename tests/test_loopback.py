"""A local run's listeners stay on loopback: torch's rendezvous store (which torch itself binds to every
interface) and gloo, checked with ``ss`` on the process that hosts them."""

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

