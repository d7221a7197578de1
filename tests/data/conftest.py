"""Data-plane fixtures: one synthetic benchmark per test session (built in ~20 s on 2 cores), and
HTTP servers on 127.0.0.1 that serve a root for the URL tests."""

from __future__ import annotations

import functools
import shutil
import threading
from contextlib import ExitStack, contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The default synthetic benchmark (all seven sources), read-only for tests."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("synth")
    build_synth(str(root), seed=0, scale=1.0,
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=2, progress=False))
    return root


@pytest.fixture
def writable_copy(synth_root, tmp_path):
    """Copy some sources of the benchmark into a scratch root that a test may damage."""

    def copy(*sources: str) -> Path:
        dest = tmp_path / "root"
        dest.mkdir(exist_ok=True)
        for s in sources:
            shutil.copytree(synth_root / s, dest / s)
        return dest

    return copy


@pytest.fixture
def make_cfg():
    """``make_cfg(root, **fields)`` -> DataConfig at 32 px (what the CPU demo trains at)."""
    from smat_dist.data.config import DataConfig

    def make(root, **kw):
        kw.setdefault("image_size", 32)
        cfg = DataConfig(root=str(root), **kw)
        cfg.validate()
        return cfg

    return make


class QuietHandler(SimpleHTTPRequestHandler):
    """Static files over HTTP/1.0 (one request per connection), no request log on stderr."""

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass


@contextmanager
def http_server(directory, handler=QuietHandler) -> Iterator[str]:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (free port) serving ``directory``; yields its URL and
    shuts it down afterwards."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(scope="session")
def synth_url(synth_root) -> Iterator[str]:
    """The session's synthetic benchmark served over HTTP on loopback (read-only)."""
    with http_server(synth_root) as url:
        yield url


@pytest.fixture
def serve():
    """``serve(directory, handler=QuietHandler) -> URL``: servers live until the test ends."""
    with ExitStack() as stack:
        yield lambda directory, handler=QuietHandler: stack.enter_context(http_server(directory, handler))
