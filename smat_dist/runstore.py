"""Where a run's directory lives: a local path, or an object-storage URI (``s3://``, ``gs://``).

The run directory is ``<dist.storage_path or train.output_dir>/<train.run_name>`` and holds
``run_config.yaml``, ``metrics.jsonl``, ``train.log``, the checkpoints and the export
(``model.safetensors``). A :class:`RunStore` names it (``uri``) and says where the processes of this
node write it (``local``):

* a local path: ``local`` is the run directory itself (a shared filesystem for multi-node runs);
* a URI: ranks write to a node-local staging directory (``dist.staging_dir``, default
  ``$TMPDIR/smat-staging``), and rank 0 copies the run's files to the URI after every checkpoint and
  at the end (:meth:`RunStore.push`); checkpoints are uploaded whole, their sidecar last, so a reader
  of the bucket sees a checkpoint only when it is complete. Under Ray, Ray Train writes the
  checkpoints to the URI itself (its ``storage_path``). A restarted or resumed run first copies
  ``metrics.jsonl`` and ``train.log`` back (:meth:`RunStore.pull`) and downloads the checkpoint it
  resumes from (:meth:`RunStore.fetch`), so resuming by run name works from the bucket alone.

Readers (``smat-eval --checkpoint``, ``smat-sweep``) use :func:`fetch_run_file` for a URI.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from smat_dist import objstore
from smat_dist.errors import ConfigError
from smat_dist.fsutil import atomic_write_text, check_writable_dir
from smat_dist.train import checkpoint as ckpt

STAGING_DEFAULT = "smat-staging"
RESUME_DIR = ".resume"  # under ``local``: checkpoints downloaded to resume from


def default_staging_root() -> Path:
    return Path(tempfile.gettempdir()) / STAGING_DEFAULT


def _is_other_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://") and not objstore.is_uri(text)


class RunStore:
    """One run directory (see the module docstring). ``storage``: the directory or URI holding runs."""

    def __init__(self, storage: str | Path, run_name: str, staging_dir: Optional[str] = None):
        storage = str(storage)
        if _is_other_url(storage):
            raise ConfigError(f"dist.storage_path / train.output_dir {storage!r}: runs are stored in a local "
                              f"directory or object storage ({', '.join(s + '://' for s in objstore.SCHEMES)})")
        self.run_name = run_name
        self.remote = objstore.is_uri(storage)
        if self.remote:
            self.storage = storage.rstrip("/")
            self.uri = objstore.join(self.storage, run_name)
            root = Path(staging_dir).expanduser() if staging_dir else default_staging_root()
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
            self.local = root.resolve() / f"{run_name}-{digest}"
        else:
            base = Path(storage[len("file://"):] if storage.startswith("file://") else storage)
            self.storage = str(base.expanduser().resolve())
            self.local = Path(self.storage) / run_name
            self.uri = str(self.local)

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r}, local={str(self.local)!r})"

    def url(self, rel: str) -> str:
        """Where ``rel`` of the run lives (a path or a URI; what messages name)."""
        return objstore.join(self.uri, rel) if self.remote else str(self.local / rel)

    # ------------------------------------------------------------------------------ run files
    def push(self, *rels: str) -> None:
        """Copy these files of the run from ``local`` to the store (nothing to do for a local store)."""
        if not self.remote:
            return
        for rel in rels:
            p = self.local / rel
            if p.is_file():
                objstore.upload(p, self.url(rel))

    def pull(self, *rels: str) -> None:
        """Copy these files of the run from the store to ``local`` where the store has them."""
        if not self.remote:
            return
        for rel in rels:
            if objstore.kind(self.url(rel)) == "file":
                objstore.download(self.url(rel), self.local / rel)

    def append(self, rel: str, text: str) -> None:
        """Append ``text`` to ``rel`` in the store itself (read, extend, rewrite: objects cannot be appended to)."""
        if not self.remote:
            with open(self.local / rel, "a") as f:
                f.write(text)
            return
        uri = self.url(rel)
        old = objstore.read_bytes(uri) if objstore.kind(uri) == "file" else b""
        objstore.write_bytes(uri, old + text.encode())

    def write_text(self, rel: str, text: str) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.local / rel, text)
        self.push(rel)

    def check_writable(self) -> None:
        """PermissionError / :class:`~smat_dist.objstore.StorageError` when the run cannot be written."""
        if self.remote:
            objstore.check_writable(self.uri)
            return
        check_writable_dir(self.local, "the run directory: train.output_dir / dist.storage_path")

    # ------------------------------------------------------------------------------ checkpoints
    def scan(self) -> Tuple[Optional[str], List[Tuple[str, str]]]:
        """(the latest complete checkpoint by step, [(incomplete checkpoint, why)]): :func:`ckpt.scan`,
        read from the bucket for a remote store."""
        if not self.remote:
            latest, broken = ckpt.scan(self.local)
            return (str(latest) if latest else None), [(str(d), why) for d, why in broken]
        best, best_step, broken = None, -1, []
        for name in objstore.children(self.uri):
            if not name.startswith("checkpoint_") or name.endswith(ckpt.PARTIAL_SUFFIX):
                continue
            where = objstore.join(self.uri, name)
            try:
                meta = inspect(where)
            except ckpt.CheckpointError as exc:
                broken.append((where, str(exc)))
                continue
            if meta.step > best_step:
                best, best_step = where, meta.step
        return best, broken

    def resume_point(self, resume_from: Optional[str]) -> Optional[str]:
        """Where the run continues from: its own latest checkpoint, else ``dist.resume_from`` (a path or
        URI, checked); None for a fresh start."""
        own = ckpt.find_latest(self.local) if not self.remote else self.scan()[0]
        if own is not None:
            return str(own)
        if not resume_from:
            return None
        if objstore.is_uri(resume_from):
            inspect(resume_from)
            return resume_from
        path = Path(resume_from).expanduser().resolve()
        ckpt.inspect(path)
        return str(path)

    def fetch_target(self, where: str) -> Path:
        """The local directory :meth:`fetch` puts checkpoint ``where`` in (``where`` itself when local)."""
        if not objstore.is_uri(where):
            return Path(where)
        return self.local / RESUME_DIR / where.rstrip("/").rsplit("/", 1)[-1]

    def fetch(self, where: str) -> Path:
        """A local directory holding checkpoint ``where`` (downloaded into ``local`` when it is a URI)."""
        dest = self.fetch_target(where)
        if objstore.is_uri(where):
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
            objstore.download(where, dest)
        return dest

    def upload_checkpoint(self, directory: Path, *, sidecar: bool) -> None:
        """Copy a checkpoint directory written under ``local`` to the store: its engine files, or only
        its sidecar (written last, after every node's files are up)."""
        if not self.remote:
            return
        dest = objstore.join(self.uri, directory.name.removesuffix(ckpt.PARTIAL_SUFFIX))
        if sidecar:
            objstore.upload(directory / ckpt.META_FILE, objstore.join(dest, ckpt.META_FILE))
            return
        for p in sorted(directory.rglob("*")):
            if p.is_file() and p.name != ckpt.META_FILE:
                objstore.upload(p, objstore.join(dest, p.relative_to(directory).as_posix()))

    def prune(self, keep: int) -> None:
        """Keep the ``keep`` newest launcher-written checkpoints in the store (0 keeps all)."""
        if not self.remote or keep <= 0:
            return
        found = [n for n in objstore.children(self.uri) if n.startswith(ckpt.LOCAL_PREFIX)
                 and not n.endswith(ckpt.PARTIAL_SUFFIX)]
        for old in sorted(found)[:-keep]:
            objstore.remove(objstore.join(self.uri, old))


def inspect(where: str) -> ckpt.CheckpointMeta:
    """:func:`ckpt.inspect` of a checkpoint in object storage: its sidecar, and every engine file the
    sidecar names present and non-empty (the zip structure is checked when it is loaded)."""
    if not objstore.is_uri(where):
        return ckpt.inspect(where)
    side = objstore.join(where, ckpt.META_FILE)
    try:
        text = objstore.read_bytes(side).decode()
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{where}: not a smat-dist checkpoint (no {ckpt.META_FILE})") from None
    meta = ckpt.CheckpointMeta.from_text(text, side)
    have = objstore.sizes(where)
    for rel in ckpt.expected_files(meta):
        if not have.get(rel):
            raise ckpt.CheckpointError(f"{objstore.join(where, rel)}: missing (the checkpoint of step {meta.step} "
                                       f"is incomplete)")
    return meta


def fetch_run_file(where: str, rel: str, cache: Optional[Path] = None) -> Path:
    """A local copy of ``rel`` in the run directory ``where`` (a URI; ``where`` itself when it names a
    ``.safetensors`` file), downloaded into ``cache`` (default under the staging root), for readers such
    as ``smat-eval --checkpoint s3://...``."""
    where = where.rstrip("/")
    target = where if where.endswith(".safetensors") or not rel else objstore.join(where, rel)
    digest = hashlib.sha1(target.encode()).hexdigest()[:12]
    dest = (cache or default_staging_root() / "fetched") / digest / target.rsplit("/", 1)[-1]
    objstore.download(target, dest)  # every time: a run re-trained under the same name has a new export
    return dest


__all__ = ["RunStore", "inspect", "fetch_run_file", "default_staging_root", "RESUME_DIR"]
