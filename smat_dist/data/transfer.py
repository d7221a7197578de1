"""Moving converted sources between roots, whole files checked against the manifest, manifest last.

* :func:`stage`: a local or URL root -> a node-local directory (``data.local_root``); files that
  already match the manifest are kept, so an interrupted stage resumes.
* :func:`upload`: a local root -> a URL (object storage), through webdataset's writers
  (``pipe:`` commands get each file on stdin, http(s) is an HTTP PUT, ``s3://``/``gs://`` their
  CLIs). Per source the manifest goes last, and ``sources.json`` after every source, so a reader
  never lists a source whose files are not all there. ``sources.json`` lists the sources uploaded
  plus those the destination already listed; a ``pipe:`` target cannot be read back, so there it
  lists this upload's sources only (upload them in one call).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from smat_dist.data.cache import copy_checked
from smat_dist.data.format import (CLASSES_PATTERN, MANIFEST, SOURCES_FILE, SPEC_FILE, DataError, check_manifest,
                                   check_rel_path, sha256_file, sources_doc)
from smat_dist.data.location import DataRoot, failure
from smat_dist.data.store import Catalog
from smat_dist.data.writer import write_sources_index
from smat_dist.fsutil import atomic_write_bytes, publish

Root = Union[str, Path, DataRoot]


def _loc(root: Root) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


def source_files(man: dict) -> List[Tuple[str, Optional[dict]]]:
    """Every file of a source (relative path, its manifest record if it has one), manifest excluded."""
    files: List[Tuple[str, Optional[dict]]] = [(man.get("spec", SPEC_FILE), None)]
    for split, sp in man["splits"].items():
        files += [(sh["path"], sh) for sh in sp["shards"]]
        files += [(sp["index"]["path"], sp["index"]), (CLASSES_PATTERN.format(split=split), None)]
    return files


def stage(src_root: Root, dest_root: str | Path, sources: Optional[Sequence[str]] = None) -> List[str]:
    """Copy converted sources from a local or URL root to node-local storage (``data.local_root``),
    manifest last.

    Files already at the destination with the manifest's size and sha256 are not copied again,
    so re-staging after an interrupted copy only moves what is missing. Returns the sources copied.
    """
    loc = _loc(src_root)
    dest_root = Path(dest_root)
    names = list(sources) if sources else Catalog(loc).sources()
    for name in names:
        d = dest_root / name
        try:
            mraw = loc.read_bytes(f"{name}/{MANIFEST}")
            man = json.loads(mraw)
        except (OSError, ValueError) as exc:
            raise DataError(f"manifest unreadable: {loc.url(f'{name}/{MANIFEST}')} ({failure(exc)})") from None
        check_manifest(man, loc.url(f"{name}/{MANIFEST}"))
        if (d / MANIFEST).exists():
            (d / MANIFEST).unlink()  # incomplete until the manifest lands again
        for rel, rec in source_files(man):
            check_rel_path(rel, loc.url(f"{name}/{MANIFEST}"))
            t = d / rel
            if rec and t.is_file() and t.stat().st_size == rec["bytes"] and sha256_file(t) == rec["sha256"]:
                continue
            t.parent.mkdir(parents=True, exist_ok=True)
            tmp = t.with_name(t.name + ".part")
            url = loc.url(f"{name}/{rel}")
            published = False
            try:
                with loc.open(f"{name}/{rel}") as src, open(tmp, "wb") as out:
                    sha, n = copy_checked(src, out, rec["bytes"] if rec else 1 << 62)
                if rec and (n != rec["bytes"] or sha != rec["sha256"]):
                    raise DataError(f"{url}: copied {n} bytes that do not match the manifest (size {rec['bytes']}, "
                                    "sha256)")
                publish(tmp, t)
                published = True
            except (OSError, ValueError) as exc:
                raise DataError(f"{url}: copy failed ({failure(exc)})") from None
            finally:  # on every way out (an interrupt included), a partial copy goes
                if not published:
                    tmp.unlink(missing_ok=True)
        atomic_write_bytes(d / MANIFEST, mraw)  # last, synced: the staged source is complete
    if names:
        write_sources_index(dest_root)
    return names


def upload(out_root: str | Path, dest: Root, sources: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """Upload sources of the local root ``out_root`` to ``dest``; returns (source, files uploaded)."""
    src = _loc(out_root)
    if src.remote:
        raise DataError(f"{out_root}: upload reads a local root (stage a URL root first)")
    loc = _loc(dest)
    catalog = Catalog(src.path)
    names = list(sources) if sources else catalog.sources()
    done = []
    for name in names:
        man = catalog.store(name).manifest
        files = source_files(man) + [(MANIFEST, None)]  # manifest last
        for rel, _ in files:
            check_rel_path(rel, str(src.local(f"{name}/{MANIFEST}")))
            try:
                loc.write_from(f"{name}/{rel}", src.local(f"{name}/{rel}"))
            except (OSError, ValueError) as exc:
                raise DataError(f"upload of {src.local(f'{name}/{rel}')} to {loc.url(f'{name}/{rel}')} failed "
                                f"({failure(exc)})") from None
        done.append((name, len(files)))
    listed = set(names)
    if not loc.spec.startswith("pipe:"):  # keep what the destination already lists (a pipe: target is write-only)
        try:
            listed |= set(json.loads(loc.read_bytes(SOURCES_FILE))["sources"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        loc.write_text(SOURCES_FILE, sources_doc(listed))
    except (OSError, ValueError) as exc:
        raise DataError(f"upload of {SOURCES_FILE} to {loc.url(SOURCES_FILE)} failed ({failure(exc)})") from None
    return done


__all__ = ["source_files", "stage", "upload"]
