"""Dataset roots: a local directory or a URL, opened through webdataset's URL machinery.

A root (``data.root``, ``smat-data ... ROOT``, ``smat-eval --data``) is one of

* a local path (or ``file://`` URL): read in place, as before;
* ``http://`` / ``https://`` (read with ``curl`` under the redirect rule of
  :mod:`smat_dist.data.curl`, uploaded with webdataset's curl opener), ``s3://`` / ``gs://``
  (object storage through pyarrow.fs, :mod:`smat_dist.objstore`, registered below in webdataset's
  scheme table) and the other schemes of ``webdataset.gopen.gopen_schemes``: a file under the
  root is the root URL + ``/`` + its relative path;
* ``pipe:COMMAND`` with a ``{shard}`` placeholder that is replaced by the relative path of the
  file wanted (manifests and indexes too, not only shards), e.g.
  ``pipe:curl -sf https://host/md/{shard}``. Relative paths are checked against a strict
  pattern before they reach a shell. Such a root is code: it runs with the user's rights, so
  ``data.remote.allow_pipe=false`` or ``SMAT_DATA_ALLOW_PIPE=0`` in the environment refuses it.

Every remote read goes through :func:`open_url`: a
:class:`~smat_dist.data.deadline.GuardedReader` with the connect, stall and whole-file deadlines
and the retries of ``data.remote``.

Remote roots cannot be listed, so their sources come from ``sources.json`` (written by the
converters, ``smat-data upload`` and ``smat-data index``). Writing (``smat-data upload``) goes
through the same openers in ``wb`` mode: ``pipe:`` commands receive the bytes on stdin,
http(s) is an HTTP PUT (``curl -T``), ``s3://`` and ``gs://`` an object upload.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

from smat_dist.data.format import check_rel_path
from smat_dist.fsutil import atomic_write_text, publish, tmp_path_for

PLACEHOLDER = "{shard}"
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def _gopen_object_store(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """``s3://`` / ``gs://`` through :mod:`smat_dist.objstore` (pyarrow.fs), in webdataset's opener
    signature: the standard AWS/GCS endpoint and credential settings apply, no CLI is needed."""
    from smat_dist import objstore

    if mode[0] == "r":
        return objstore.open_input(url)
    if mode[0] == "w":
        return objstore.open_output(url)
    raise ValueError(f"{mode}: unknown mode")


def openers():
    """``webdataset.gopen`` with our object-storage entries registered (webdataset has no s3 entry and
    shells out to ``gsutil`` for gs). Imported on first remote use only: webdataset imports torch
    (~1 s), which local roots and light processes do without."""
    import importlib

    from smat_dist.objstore import SCHEMES

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)
    for scheme in SCHEMES:
        gopen.gopen_schemes[scheme] = _gopen_object_store
    return gopen


PIPE_ENV = "SMAT_DATA_ALLOW_PIPE"


def open_url(url: str, limits: Any) -> BinaryIO:
    """A read-only stream of ``url`` within the deadlines and retries of ``limits`` (a
    RemoteConfig); http(s) through :class:`~smat_dist.data.curl.CurlStream`, other schemes and
    ``pipe:`` commands through webdataset's openers."""
    from smat_dist.data.deadline import GuardedReader

    m = _SCHEME_RE.match(url)
    if m and m["scheme"].lower() in ("http", "https"):
        from smat_dist.data.curl import CurlStream

        def opener():
            return CurlStream(url, connect_timeout_s=limits.connect_timeout_s, redirects=limits.redirects)
    else:
        def opener():
            return openers().gopen(url, "rb")
    return GuardedReader(url, opener, limits)


def _default_limits():
    from smat_dist.data.config import RemoteConfig

    return RemoteConfig()


class RootError(ValueError):
    """A root string that cannot be used; the message names it."""


def is_url(root: str | Path) -> bool:
    """True for roots read through an opener (``pipe:`` or ``scheme://``, except ``file://``)."""
    s = str(root)
    if s.startswith("pipe:"):
        return True
    m = _SCHEME_RE.match(s)
    return bool(m) and m["scheme"].lower() != "file"


def resolve_root(root: str | Path) -> str:
    """A URL unchanged; a local path made absolute (what a subprocess elsewhere can use)."""
    if is_url(root):
        return str(root)
    return str(DataRoot(root).path.expanduser().resolve())


def failure(exc: BaseException) -> str:
    """A short reason for a failed open/read (webdataset's pipe errors carry the whole argv)."""
    text = str(exc)
    m = re.search(r"exit (\d+)", text)
    if m:
        code = int(m.group(1))
        hint = {22: "HTTP error status, e.g. 404 not found", 6: "host not resolved", 7: "connection refused",
                18: "transfer cut short", 28: "timed out", 56: "connection reset",
                127: "command not found"}.get(code)
        return f"command exited with status {code}" + (f" ({hint})" if hint else "")
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if getattr(exc, "reason", None):  # a RemoteReadError: the reason without the URL callers name
        return str(exc.reason)[:300]
    return f"{type(exc).__name__}: {text}"[:300]


class DataRoot:
    """Where a dataset lives; maps relative paths (``glyphs/manifest.json``) to paths or URLs.
    ``limits`` (a RemoteConfig, defaults if None) governs its remote reads and ``pipe:`` use."""

    def __init__(self, root: str | Path, limits: Any = None):
        s = str(root)
        self.spec = s
        self.limits = limits if limits is not None else _default_limits()
        self.remote = is_url(s)
        self.path: Optional[Path] = None
        if not self.remote:
            self.path = Path(url2pathname(urlparse(s).path)) if s.startswith("file://") else Path(s)
        elif s.startswith("pipe:"):
            if os.environ.get(PIPE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
                raise RootError(f"{s!r}: pipe: roots run a command and are refused here ({PIPE_ENV}="
                                f"{os.environ[PIPE_ENV]} in the environment)")
            if not self.limits.allow_pipe:
                raise RootError(f"{s!r}: pipe: roots run a command and are refused (data.remote.allow_pipe=false)")
            if PLACEHOLDER not in s:
                raise RootError(f"pipe: root {s!r} needs a {PLACEHOLDER} placeholder for the relative file path, "
                                f"e.g. 'pipe:curl -sf https://host/md/{PLACEHOLDER}'")
        else:
            scheme = _SCHEME_RE.match(s)["scheme"].lower()
            schemes = openers().gopen_schemes
            if scheme not in schemes:
                raise RootError(f"{s}: no webdataset opener for {scheme}:// (have "
                                f"{sorted(k for k in schemes if not k.startswith('_'))})")

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"DataRoot({self.spec!r})"

    def url(self, rel: str) -> str:
        """The path or URL of ``rel`` under this root (what messages name and openers open)."""
        if not self.remote:
            return str(self.path / rel)
        check_rel_path(rel, self.spec)
        if self.spec.startswith("pipe:"):
            return self.spec.replace(PLACEHOLDER, rel)
        return self.spec.rstrip("/") + "/" + rel

    def local(self, rel: str) -> Path:
        assert self.path is not None, "local() of a remote root"
        return self.path / rel

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        """A stream of ``rel`` (``rb``) or to it (``wb``), through ``webdataset.gopen``."""
        if not self.remote:
            p = self.local(rel)
            if mode == "wb":
                p.parent.mkdir(parents=True, exist_ok=True)
            return open(p, mode)
        if mode == "rb":
            return open_url(self.url(rel), self.limits)
        return openers().gopen(self.url(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        """The whole of ``rel``. Raises OSError/ValueError as the opener does (callers name the file)."""
        if not self.remote:
            return self.local(rel).read_bytes()
        with self.open(rel) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        """Write ``text`` to ``rel`` under this root (atomically for local roots, an upload for remote ones)."""
        if not self.remote:
            dest = self.local(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dest, text)
            return
        with self.open(rel, "wb") as fout:
            fout.write(text.encode())

    def write_from(self, rel: str, src: Path) -> None:
        """Copy a local file to ``rel`` under this root (an upload for remote roots; local
        destinations are written under a temporary name and renamed)."""
        if not self.remote:
            dest = self.local(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path_for(dest)
            shutil.copyfile(src, tmp)
            publish(tmp, dest)
            return
        with open(src, "rb") as fin, self.open(rel, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


__all__ = ["DataRoot", "PIPE_ENV", "PLACEHOLDER", "RootError", "failure", "is_url", "open_url", "openers",
           "resolve_root"]
