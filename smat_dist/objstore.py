"""Object storage (``s3://``, ``gs://``) through ``pyarrow.fs``, the library Ray Train itself uses.

One home for every byte this package moves to or from a bucket: dataset shards (registered as
webdataset openers by :mod:`smat_dist.data.location`), run directories (:mod:`smat_dist.runstore`),
exports read back by ``smat-eval``. Endpoint and credentials come only the standard way, so the same
code talks to AWS, GCS or any S3-compatible server without a setting of ours:

* S3: ``AWS_ENDPOINT_URL`` (an S3-compatible server), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, or the node's identity (instance profile, IRSA / EKS Pod Identity);
* GCS: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS`` or the node's service account).

Nothing here shells out; errors are :class:`StorageError` naming the URI.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import BinaryIO, Dict, List, Tuple

SCHEMES = ("s3", "gs", "gcs")
_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


class StorageError(OSError):
    """A bucket or object that cannot be read or written; the message names the URI and why."""


def is_uri(text: str | Path) -> bool:
    """True for an object-storage URI this module serves (``s3://``, ``gs://``)."""
    m = _URI_RE.match(str(text))
    return bool(m) and m["scheme"].lower() in SCHEMES


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def split(uri: str) -> Tuple[str, str]:
    """``s3://bucket/a/b`` -> ("s3", "bucket/a/b")."""
    m = _URI_RE.match(uri)
    if not m or m["scheme"].lower() not in SCHEMES:
        raise StorageError(f"{uri}: not an object-storage URI ({'://, '.join(SCHEMES)}://)")
    return m["scheme"].lower(), m["rest"].strip("/")


_filesystems: Dict[Tuple[str, str], object] = {}
_lock = threading.Lock()


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for ``uri``; one filesystem object per scheme and bucket."""
    import pyarrow.fs as pafs

    scheme, path = split(uri)
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    key = (scheme, bucket)
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:
                fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
            except Exception as exc:  # e.g. an unresolvable region or credentials error
                raise StorageError(f"{uri}: cannot open the object store: {reason(exc)}") from None
            _filesystems[key] = fs
    return fs, path


def reason(exc: BaseException) -> str:
    """The useful part of a pyarrow error (its messages carry request ids and hints)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "the bucket does not exist"
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "403", "INVALID_ACCESS_KEY", "SIGNATURE")):
        return f"access denied (check the credentials: AWS_* variables or the node's identity): {text[:200]}"
    if "NETWORK_CONNECTION" in text or "Couldn't connect" in text or "curlCode: 7" in text:
        return f"cannot connect (check AWS_ENDPOINT_URL / the network): {text[:200]}"
    return text[:300]


def _wrap(uri: str, exc: BaseException) -> OSError:
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{uri}: not found")
    return StorageError(f"{uri}: {reason(exc)}")


def _open(uri: str, method: str) -> BinaryIO:
    fs, path = filesystem(uri)
    try:
        return getattr(fs, method)(path)
    except Exception as exc:
        raise _wrap(uri, exc) from None


def open_input(uri: str) -> BinaryIO:
    """A sequential read stream of one object (``with`` it; ``read(n)``)."""
    return _open(uri, "open_input_stream")


def open_output(uri: str) -> BinaryIO:
    """A write stream to one object; the object appears (whole) when the stream is closed."""
    return _open(uri, "open_output_stream")


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        try:
            return f.read()
        except Exception as exc:
            raise _wrap(uri, exc) from None


def write_bytes(uri: str, data: bytes) -> None:
    try:
        with open_output(uri) as f:
            f.write(data)
    except StorageError:
        raise
    except Exception as exc:
        raise _wrap(uri, exc) from None


def kind(uri: str) -> str:
    """"file", "dir" or "missing"."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        t = fs.get_file_info(path).type
    except Exception as exc:
        raise _wrap(uri, exc) from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def sizes(uri: str) -> Dict[str, int]:
    """Every object under the prefix ``uri``: relative path -> size (empty when there is none)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def children(uri: str) -> List[str]:
    """Names of the "directories" directly under ``uri`` (sorted)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except Exception as exc:
        raise _wrap(uri, exc) from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload(local: Path, uri: str) -> None:
    """Copy a local file, or a directory tree, to ``uri``."""
    local = Path(local)
    if local.is_dir():
        for p in sorted(local.rglob("*")):
            if p.is_file():
                upload(p, join(uri, p.relative_to(local).as_posix()))
        return
    try:
        with open(local, "rb") as src, open_output(uri) as dst:
            while True:
                b = src.read(8 << 20)
                if not b:
                    break
                dst.write(b)
    except (StorageError, FileNotFoundError):
        raise
    except Exception as exc:
        raise _wrap(uri, exc) from None


def download(uri: str, local: Path) -> None:
    """Copy the object ``uri`` (or every object under that prefix) to ``local``; each file is written
    under a temporary name and renamed, so a reader never sees half of one."""
    local = Path(local)
    if kind(uri) == "file":
        _download_file(uri, local)
        return
    found = sizes(uri)
    if not found:
        raise FileNotFoundError(f"{uri}: not found")
    for rel in sorted(found):
        _download_file(join(uri, rel), local / rel)


def _download_file(uri: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.download")  # concurrent readers
    try:
        with open_input(uri) as src, open(tmp, "wb") as out:
            while True:
                b = src.read(8 << 20)
                if not b:
                    break
                out.write(b)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove(uri: str) -> None:
    """Delete every object under the prefix ``uri`` (nothing there is fine)."""
    fs, path = filesystem(uri)
    if kind(uri) == "missing":
        return
    try:
        if kind(uri) == "file":
            fs.delete_file(path)
        else:
            fs.delete_dir(path)
    except Exception as exc:
        raise _wrap(uri, exc) from None


def check_writable(uri: str) -> None:
    """Write and delete a marker object under ``uri``: the bucket exists, the credentials may write.
    Raises :class:`StorageError` saying which of that failed."""
    marker = join(uri, ".smat-write-check")
    try:
        write_bytes(marker, b"ok")
        remove(marker)
    except OSError as exc:
        why = str(exc).split(": ", 1)[-1]
        raise StorageError(f"{uri}: cannot write there: {why}") from None


__all__ = ["SCHEMES", "StorageError", "is_uri", "join", "split", "filesystem", "reason", "open_input", "open_output",
           "read_bytes", "write_bytes", "kind", "sizes", "children", "upload", "download", "remove",
           "check_writable"]
