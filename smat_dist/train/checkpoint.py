"""Checkpoints of a run: where they are, what their sidecar says, whether they can be resumed.

A checkpoint is a directory ``<run_dir>/checkpoint_step_<step>/`` holding the engine's files under a tag
(``step_00000500/``) and the sidecar ``smat_checkpoint.json`` that says what wrote it: the meta-step, the
meta-batch, world size, ZeRO stage, engine and a fingerprint of θ_pre.

Whole or absent: the sidecar is the commit marker. It is written after every rank's engine files are in
place, in one atomic step (a rename on a filesystem, one PUT on an object store), so a crash at any
point of a checkpoint write leaves either a whole checkpoint or a directory without a sidecar, which is
*unfinished*: not a checkpoint, skipped by every reader (the torchrun and single-process launchers
also build the directory under a ``.partial`` name and rename it). A directory whose sidecar is there
but whose files are missing or torn was damaged after it was written: it is skipped with a warning,
and a run with nothing but damaged checkpoints refuses to start afresh.

"Latest" has one meaning, :func:`find_latest` (the whole checkpoint with the highest step), used by
preflight and by every launcher's ranks, including Ray workers after a restart (Ray Train's own
record of reported checkpoints is not consulted: it can lag the directory by one checkpoint).

Everything here is checked before a rank starts, so a bad resume is one line naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from smat_dist.fsutil import atomic_write_text
from smat_dist.weightsfile import WeightsError, check_weights_file

META_FILE = "smat_checkpoint.json"
FORMAT = "smat-dist-checkpoint-v2"
LOCAL_PREFIX = "checkpoint_step_"
PARTIAL_SUFFIX = ".partial"


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


@dataclass
class CheckpointMeta:
    tag: str
    step: int  # meta-steps completed
    tasks_per_step: int
    world_size: int
    zero_stage: int
    engine: str  # "deepspeed" | "local"
    theta_pre: str  # θ_pre fingerprint
    format: str = FORMAT

    @classmethod
    def from_json(cls, path: Path) -> "CheckpointMeta":
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: not a smat-dist checkpoint (no {META_FILE})") from None
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint sidecar ({exc})") from None
        return cls.from_text(text, path)

    @classmethod
    def from_text(cls, text: str, path: str | Path) -> "CheckpointMeta":
        """The sidecar's content read from ``path`` (a file or an object-storage URI, for messages)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint sidecar ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{path}: not a {FORMAT} sidecar (format={got!r})")
        try:
            meta = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except KeyError as exc:
            raise CheckpointError(f"{path}: checkpoint sidecar lacks the field {exc.args[0]!r}") from None
        return meta

    def write(self, directory: Path) -> None:
        commit(self, None, str(directory))


def expected_files(meta: CheckpointMeta) -> List[str]:
    """Files (relative to the checkpoint directory) the engine must have written for ``meta``."""
    if meta.engine == "local":
        return [f"{meta.tag}/state.pt"]
    files = [f"{meta.tag}/mp_rank_00_model_states.pt"]
    if meta.zero_stage > 0:
        files += [f"{meta.tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(meta.world_size)]
    return files


def inspect(directory: str | Path) -> CheckpointMeta:
    """The sidecar of a complete checkpoint, or :class:`CheckpointError` naming what is missing or torn.

    ``.pt`` files are zip archives: a truncated one has no readable central directory, which is
    checked without loading any tensor (:func:`smat_dist.weightsfile.check_weights_file`).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    meta = CheckpointMeta.from_json(directory / META_FILE)
    for rel in expected_files(meta):
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint of step {meta.step} is incomplete)")
        try:
            check_weights_file(path, "checkpoint")
        except WeightsError as exc:
            raise CheckpointError(str(exc)) from None
    return meta


def check_resumable(meta: CheckpointMeta, where: Path, *, tasks_per_step: int, world_size: int, engine: str,
                    theta_pre: Optional[str]) -> None:
    """Refuse a checkpoint this run cannot continue exactly (``theta_pre=None``: not known yet, not checked)."""
    if theta_pre is not None and meta.theta_pre != theta_pre:
        raise CheckpointError(
            f"{where}: trained on other pre-trained weights (θ_pre fingerprint {meta.theta_pre} != {theta_pre}); "
            f"check model.backbone.checkpoint")
    if meta.tasks_per_step != tasks_per_step:
        raise CheckpointError(
            f"{where}: written with train.tasks_per_step={meta.tasks_per_step}, this run has {tasks_per_step}: "
            f"the episode stream and schedule would not continue; keep it equal")
    if meta.engine != engine:
        raise CheckpointError(
            f"{where}: written by the {meta.engine} engine, this launcher uses {engine} (single-process runs use "
            f"the local engine; Ray and torchrun ranks DeepSpeed); resume it with the launcher that wrote it")
    if meta.world_size != world_size and meta.zero_stage > 0:
        raise CheckpointError(
            f"{where}: holds ZeRO-{meta.zero_stage} optimizer partitions of {meta.world_size} ranks; resume with "
            f"dist.num_workers={meta.world_size}. To change the worker count, resume with that count and "
            f"dist.zero_stage=0 once, let it write a checkpoint (ZeRO-0 checkpoints hold the whole optimizer "
            f"state), then resume that on any number of workers")


def unfinished(directory: Path) -> bool:
    """A checkpoint directory whose write never committed: no sidecar, or an empty one (left by versions
    that copied the sidecar with the other files), or a ``.partial`` name."""
    if directory.name.endswith(PARTIAL_SUFFIX):
        return True
    try:
        return (directory / META_FILE).stat().st_size == 0
    except FileNotFoundError:
        return True


def scan(run_dir: str | Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(the latest whole checkpoint by step or None, [(damaged checkpoint, why)] oldest first).

    Unfinished directories (a write that was interrupted or is in progress) are not checkpoints and are
    left out of both.
    """
    best: Optional[Path] = None
    best_step = -1
    broken: List[Tuple[Path, str]] = []
    found = []
    for d in Path(run_dir).glob("checkpoint_*"):
        try:
            if d.is_dir() and not unfinished(d):
                found.append((d.stat().st_mtime, d))
        except FileNotFoundError:  # pruned while we looked
            continue
    for _, d in sorted(found):
        try:
            meta = inspect(d)
        except CheckpointError as exc:
            broken.append((d, str(exc)))
            continue
        if meta.step > best_step:
            best, best_step = d, meta.step
    return best, broken


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The run's latest whole checkpoint directory (by step), or None: the one meaning of "latest".
    Damaged ones are skipped (with a warning when they are newer than the one returned: work since
    then is redone)."""
    best, broken = scan(run_dir)
    if best is not None:
        newer = [(d, why) for d, why in broken if d.stat().st_mtime > best.stat().st_mtime]
        for d, why in newer:
            log.warning("skipping incomplete checkpoint %s (%s); resuming from %s", d, why, best)
    return best


def resume_point(run_dir: Path, resume_from: Optional[str]) -> Optional[Path]:
    """Where a run continues from: its own latest checkpoint, else ``dist.resume_from`` (checked)."""
    own = find_latest(run_dir)
    if own is not None:
        return own
    if resume_from:
        path = Path(resume_from).expanduser().resolve()
        inspect(path)
        return path
    return None


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def dir_name(step: int) -> str:
    """The directory name of the checkpoint of ``step`` under the run directory (every launcher)."""
    return f"{LOCAL_PREFIX}{step:08d}"


def local_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / dir_name(step)


def commit(meta: CheckpointMeta, fs, directory: str) -> None:
    """Write the sidecar of a checkpoint whose engine files are all in place: the commit.

    ``fs``: a ``pyarrow.fs.FileSystem`` (Ray Train's storage) or None for a local path. A local write is a
    fsynced rename; on an object store one PUT of a small object is atomic."""
    text = json.dumps(asdict(meta), indent=1)
    if fs is None or type(fs).__name__ == "LocalFileSystem":
        atomic_write_text(Path(directory) / META_FILE, text)
        return
    with fs.open_output_stream(f"{directory.rstrip('/')}/{META_FILE}") as f:
        f.write(text.encode())


def step_of(directory: Path) -> Optional[int]:
    """The step in a ``checkpoint_step_<step>[.partial]`` name, or None for other names."""
    name = directory.name[len(LOCAL_PREFIX):] if directory.name.startswith(LOCAL_PREFIX) else ""
    name = name[:-len(PARTIAL_SUFFIX)] if name.endswith(PARTIAL_SUFFIX) else name
    return int(name) if name.isdigit() else None


def prune(run_dir: Path, keep: int) -> None:
    """Called after a commit: remove unfinished directories of earlier steps (debris of crashed writes;
    no write of an earlier step can be in progress) and keep the ``keep`` newest whole checkpoints
    (0 or less keeps all)."""
    found = sorted((s, d) for d in Path(run_dir).glob(f"{LOCAL_PREFIX}*")
                   if d.is_dir() and (s := step_of(d)) is not None)
    whole = [(s, d) for s, d in found if not unfinished(d)]
    if not whole:
        return
    newest = whole[-1][0]
    for s, d in found:
        if s < newest and unfinished(d):
            shutil.rmtree(d, ignore_errors=True)
    if keep > 0:
        for _, old in whole[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["CheckpointError", "CheckpointMeta", "META_FILE", "inspect", "check_resumable", "find_latest", "scan",
           "resume_point", "tag_of", "dir_name", "local_dir", "step_of", "prune", "expected_files", "commit", "unfinished"]
