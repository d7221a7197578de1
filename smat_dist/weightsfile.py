"""Is a weights file whole? Checked from its header alone, so a truncated or corrupt file is one clear
error naming it before anything loads (no tensor is read)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


class WeightsError(ValueError):
    """A weights file that cannot be loaded; the message names it."""


def check_weights_file(path: str | Path, what: str) -> None:
    """A torch zip (``.pt``/``.pth``/``.bin``) or safetensors file that is whole, from its header alone."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what}: no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise WeightsError(f"{path}: truncated or corrupt safetensors header ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from None
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise WeightsError(f"{path}: truncated safetensors file ({size} of {8 + n + end} bytes)")
            return
    if head[:2] == b"PK":  # torch's zip format: a truncated file has no readable central directory
        try:
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise WeightsError(f"{path}: truncated or corrupt weights file ({exc})") from None
    elif size == 0:
        raise WeightsError(f"{path}: empty weights file")


__all__ = ["WeightsError", "check_weights_file"]
