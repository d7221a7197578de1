"""A real S3-compatible server on 127.0.0.1 (moto's server mode) for tests and the cluster scripts.

As a library (the tests)::

    with local_s3(buckets=["data", "runs"]) as s3:
        env = s3.env()          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... to export to every process

As a command (shell scripts; prints ``export`` lines, the server runs until killed)::

    eval "$(python tools/local_s3.py start --bucket data --bucket runs --pid-file /tmp/s3.pid)"
    ...
    python tools/local_s3.py stop --pid-file /tmp/s3.pid

The server is started in its own session (``setsid``) and stopped by its process group, so it never
touches anyone else's processes. Buckets are created through the S3 API itself (pyarrow, like every
reader of ours), because pyarrow will not create one on a write. The keys are moto's dummies: the
server accepts any.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class LocalS3:
    port: int
    pid: int  # the server's process (and process-group) id
    log: Path
    buckets: List[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> Dict[str, str]:
        """The standard AWS variables that point every S3 client (pyarrow, boto3, s3fs) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str) -> None:
        from pyarrow.fs import S3FileSystem

        fs = S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(name)
        self.buckets.append(name)

    def stop(self) -> None:
        stop(self.pid)


def moto_server() -> str:
    exe = Path(sys.executable).parent / "moto_server"
    found = str(exe) if exe.exists() else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: pip install 'moto[server]==5.2.5' (in the dev extra)")
    return found


def start(buckets: Sequence[str] = (), port: Optional[int] = None, log: Optional[Path] = None,
          timeout_s: float = 60.0) -> LocalS3:
    """Start ``moto_server`` on 127.0.0.1 in a new session, wait until it answers, create ``buckets``."""
    port = port or _free_port()
    log = Path(log) if log else Path(tempfile.mkstemp(prefix="local-s3-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen([moto_server(), "-H", HOST, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LocalS3(port, proc.pid, log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc.pid)
                raise RuntimeError(f"moto_server did not start on port {port}: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    try:
        for b in buckets:
            server.create_bucket(b)
    except BaseException:
        stop(proc.pid)
        raise
    return server


def stop(pid: int) -> None:
    """Kill the server's process group (it was started in its own session) and reap it if it is our child."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: poll for it to go away
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            done = 0
        if done:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def local_s3(buckets: Sequence[str] = (), **kw) -> Iterator[LocalS3]:
    server = start(buckets, **kw)
    try:
        yield server
    finally:
        server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="A local S3-compatible server (moto) for tests and tools/cluster_e2e.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start it in the background and print the variables to export")
    s.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--pid-file", required=True, help="where to write the server's process-group id (for stop)")
    s.add_argument("--log", default=None)
    t = sub.add_parser("stop", help="stop the server of --pid-file")
    t.add_argument("--pid-file", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "start":
        server = start(a.bucket, port=a.port, log=a.log)
        Path(a.pid_file).write_text(str(server.pid))
        for k, v in server.env().items():
            print(f"export {k}={v}")
        return 0
    pid_file = Path(a.pid_file)
    if pid_file.exists():
        stop(int(pid_file.read_text()))
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
