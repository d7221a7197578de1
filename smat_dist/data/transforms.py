"""Decode + SMAT/PMF preprocessing, with all randomness drawn from a per-episode generator.

Training: RandomResizedCrop(size) with torchvision's parameter rule,
PMF's ImageJitter (Brightness, Contrast, Color, each factor ``1 + a(2u - 1)``), horizontal flip.
Evaluation: resize the shorter side to ``int(size * 256/224)`` then centre-crop ``size``.
Both produce ``uint8`` HxWx3 arrays; normalisation happens in :func:`to_tensor`, on the
consumer's side, so an episode crosses process boundaries at a quarter of its float32 size.

The random parameters of image ``p`` of an episode are a fixed row ``p`` of uniforms drawn
up-front, so they do not depend on decode order or on how many images were skipped.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance

from smat_dist.data.config import AugmentConfig

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's default bound; stated so decompression bombs stay errors
_ATTEMPTS = 10  # torchvision RandomResizedCrop
PARAMS_PER_IMAGE = _ATTEMPTS * 4 + 3 + 1
_FORMATS = ["JPEG", "PNG"]


class DecodeError(ValueError):
    pass


def decode(data: Union[bytes, np.ndarray], draft_side: Optional[int] = None) -> Image.Image:
    """Bytes (or a grey uint8 HxW array from a packed split) -> RGB PIL image (only JPEG/PNG
    decoders are ever tried). Raises :class:`DecodeError`."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 2:
            raise DecodeError(f"packed image must be uint8 HxW, got {data.dtype} {data.shape}")
        return Image.fromarray(data, "L").convert("RGB")
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
        if draft_side and img.format == "JPEG" and min(img.size) >= 2 * draft_side:
            img.draft("RGB", (draft_side, draft_side))
        img = img.convert("RGB")  # forces the full decode
        img.load()
        return img
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def crop_params(W: int, H: int, u: np.ndarray, scale: Sequence[float], ratio: Sequence[float]):
    """torchvision ``RandomResizedCrop.get_params`` driven by 40 given uniforms -> (i, j, h, w)."""
    area = W * H
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_ATTEMPTS):
        a, b, c, d = u[4 * t:4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(lr0 + (lr1 - lr0) * b)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(c * (H - h + 1)), int(d * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


class EpisodeTransform:
    """``__call__(bytes, params_row) -> uint8 (size, size, 3)``; ``params(rng, n)`` draws the rows."""

    def __init__(self, image_size: int, cfg: AugmentConfig, train: bool):
        self.size = int(image_size)
        self.cfg = cfg
        self.train = bool(train)
        self.eval_side = int(self.size * cfg.eval_resize_ratio)
        if cfg.jpeg_draft:
            self.draft = self.eval_side if not train else int(math.ceil(self.size / math.sqrt(cfg.crop_scale[0])))
        else:
            self.draft = None

    def params(self, rng: Optional[np.random.Generator], n: int) -> Optional[np.ndarray]:
        if not self.train:
            return None
        assert rng is not None
        return rng.random((n, PARAMS_PER_IMAGE))

    def __call__(self, data: Union[bytes, np.ndarray], u: Optional[np.ndarray]) -> np.ndarray:
        return self.apply(decode(data, self.draft), u)

    def apply(self, img: Image.Image, u: Optional[np.ndarray]) -> np.ndarray:
        s = self.size
        if self.train:
            cfg = self.cfg
            W, H = img.size
            i, j, h, w = crop_params(W, H, u[:4 * _ATTEMPTS], cfg.crop_scale, cfg.crop_ratio)
            img = img.resize((s, s), Image.BILINEAR, box=(j, i, j + w, i + h))
            k = 4 * _ATTEMPTS
            for enh, amount, v in ((ImageEnhance.Brightness, cfg.brightness, u[k]),
                                   (ImageEnhance.Contrast, cfg.contrast, u[k + 1]),
                                   (ImageEnhance.Color, cfg.color, u[k + 2])):
                if amount:
                    img = enh(img).enhance(1.0 + amount * (2.0 * float(v) - 1.0)).convert("RGB")
            if u[k + 3] < cfg.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            W, H = img.size
            r = self.eval_side
            if W <= H:
                ow, oh = r, int(r * H / W)
            else:
                oh, ow = r, int(r * W / H)
            if (ow, oh) != (W, H):
                img = img.resize((ow, oh), Image.BILINEAR)
            top = int(round((oh - s) / 2.0))
            left = int(round((ow - s) / 2.0))
            img = img.crop((left, top, left + s, top + s))
        out = np.asarray(img, dtype=np.uint8)
        if out.shape != (s, s, 3):
            raise DecodeError(f"transform produced {out.shape}, expected {(s, s, 3)}")
        return out


def to_tensor(batch: np.ndarray, mean: Sequence[float], std: Sequence[float], device=None):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) on ``device`` (default CPU), ``(x/255 - mean) / std``.

    On a GPU the uint8 pixels (a quarter of the float32 bytes) are copied from pinned memory without
    blocking and converted and normalised there; the arithmetic is the same on every device.
    """
    import torch

    from smat_dist.episode import to_device  # torch: the data plane itself stays torch-free

    if not batch.flags.writeable or not batch.flags.c_contiguous:  # Ray hands out read-only arrays
        batch = np.array(batch, copy=True, order="C")
    device = torch.device(device) if device is not None else torch.device("cpu")
    src = to_device(torch.from_numpy(batch), device).permute(0, 3, 1, 2)
    out = torch.empty(src.shape, dtype=torch.float32, device=device)
    out.copy_(src)  # one pass: uint8 NHWC -> float32 NCHW
    m = torch.tensor(mean, dtype=torch.float64)
    sd = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * sd)).to(torch.float32).view(1, 3, 1, 1).to(device)
    shift = (m / sd).to(torch.float32).view(1, 3, 1, 1).to(device)
    return out.mul_(scale).sub_(shift)


__all__ = ["DecodeError", "EpisodeTransform", "crop_params", "decode", "to_tensor", "PARAMS_PER_IMAGE"]
