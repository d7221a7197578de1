"""Checkpoints of a run: where they are, what their sidecar says, whether they can be resumed.

A checkpoint is a directory holding the engine's files under a tag (``step_00000500/``) and the
sidecar ``smat_checkpoint.json``, written last, that says what wrote it: the meta-step, the meta-batch,
world size, ZeRO stage, engine and a fingerprint of θ_pre. Every launcher writes the same layout
under the run directory (Ray Train names its directories ``checkpoint_<time>``, the torchrun and
single-process launchers ``checkpoint_step_<step>``), and every launcher resumes the same way: the run's
own latest complete checkpoint, else ``dist.resume_from``.

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
        atomic_write_text(Path(directory) / META_FILE, json.dumps(asdict(self), indent=1))


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


def scan(run_dir: str | Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(the latest complete checkpoint by step or None, [(incomplete checkpoint, why)] oldest first).

    ``.partial`` directories (a launcher's checkpoint being written) are not checkpoints yet and are skipped.
    """
    best: Optional[Path] = None
    best_step = -1
    broken: List[Tuple[Path, str]] = []
    for d in sorted(Path(run_dir).glob("checkpoint_*"), key=lambda p: p.stat().st_mtime):
        if not d.is_dir() or d.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            meta = inspect(d)
        except CheckpointError as exc:
            broken.append((d, str(exc)))
            continue
        if meta.step > best_step:
            best, best_step = d, meta.step
    return best, broken


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The run's latest complete checkpoint directory (by step), or None. Incomplete ones are skipped
    (with a warning when they are newer than the one returned: work since then is redone)."""
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


def local_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{LOCAL_PREFIX}{step:08d}"


def prune(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest launcher-written checkpoints (0 or less keeps all)."""
    if keep <= 0:
        return
    found = sorted(d for d in Path(run_dir).glob(f"{LOCAL_PREFIX}*") if d.is_dir() and
                   not d.name.endswith(PARTIAL_SUFFIX))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["CheckpointError", "CheckpointMeta", "META_FILE", "inspect", "check_resumable", "find_latest", "scan",
           "resume_point", "tag_of", "local_dir", "prune", "expected_files"]
