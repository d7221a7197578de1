"""Preprocessing: the eval resize/centre-crop, the seeded training augmentation, normalisation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from smat_dist.data.builder import EpisodeBuilder
from smat_dist.data.config import AugmentConfig, IMAGENET_MEAN, IMAGENET_STD
from smat_dist.data.transforms import PARAMS_PER_IMAGE, DecodeError, EpisodeTransform, crop_params, decode, to_tensor


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_eval_transform_is_resize_shorter_side_then_centre_crop():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)  # H=30, W=60
    tf = EpisodeTransform(128, AugmentConfig(), train=False)
    assert tf.eval_side == 146  # int(128 * 256 / 224), the reference's 146
    out = tf(_png(arr), None)
    ref = Image.fromarray(arr).resize((292, 146), Image.BILINEAR)  # shorter side -> 146, aspect kept
    ref = np.asarray(ref)[9:137, 82:210]  # centre crop: round((146-128)/2)=9, round((292-128)/2)=82
    assert out.shape == (128, 128, 3) and np.array_equal(out, ref)


def test_crop_params_follow_torchvision_rules():
    rng = np.random.default_rng(1)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for _ in range(500):
        W, H = (int(v) for v in rng.integers(20, 300, 2))
        u = rng.random(40)
        i, j, h, w = crop_params(W, H, u, scale, ratio)
        assert 0 <= i <= H - h and 0 <= j <= W - w and h > 0 and w > 0
        # the first attempt that fits is taken, with its area and aspect
        a, b = u[0], u[1]
        target = W * H * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * b)
        w0, h0 = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w0 <= W and 0 < h0 <= H:
            assert (h, w) == (h0, w0)
    # nothing fits (all attempts too large) -> centre crop clamped to the ratio range
    assert crop_params(100, 10, np.full(40, 0.999), scale, ratio) == (0, (100 - 13) // 2, 10, 13)


def test_training_augmentation_is_a_function_of_its_parameters():
    rng = np.random.default_rng(2)
    data = _png(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    tf = EpisodeTransform(32, AugmentConfig(), train=True)
    p = tf.params(np.random.default_rng(5), 3)
    assert p.shape == (3, PARAMS_PER_IMAGE)
    a, b, c = tf(data, p[0]), tf(data, p[0]), tf(data, p[1])
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    flip = p[0].copy()
    flip[-1] = 0.0 if p[0][-1] >= 0.5 else 0.9  # only the flip decision changes
    assert np.array_equal(tf(data, flip), tf(data, p[0])[:, ::-1])
    off = AugmentConfig(brightness=0, contrast=0, color=0, hflip=0, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0])
    sq = _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(EpisodeTransform(32, off, train=True)(sq, p[2]), np.asarray(Image.open(io.BytesIO(sq))))


def test_normalisation_and_decode_errors():
    x = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    x[1] = 255
    x.setflags(write=False)  # what Ray hands out
    t = to_tensor(x, IMAGENET_MEAN, IMAGENET_STD)
    assert t.shape == (2, 3, 4, 4) and t.dtype == torch.float32
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    assert torch.allclose(t[1, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))
    gray = _png(np.full((5, 5), 200, dtype=np.uint8))
    assert decode(gray).mode == "RGB"
    for bad in (b"", b"\0" * 64, _png(np.zeros((5, 5, 3), dtype=np.uint8))[:40]):
        with pytest.raises(DecodeError):
            decode(bad)
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(DecodeError):  # only JPEG and PNG decoders are ever tried
        decode(gif.getvalue())


def test_episode_augmentation_depends_only_on_seed_and_index(synth_root, make_cfg):
    cfg = make_cfg(synth_root)
    a = EpisodeBuilder(cfg, "train", seed=0, sources=["objects", "textures"])
    b = EpisodeBuilder(cfg, "train", seed=0, sources=["objects", "textures"])
    for g in (4, 1):
        b.build(g + 10)  # b has a different history
        ra, rb = a.build(g), b.build(g)
        assert np.array_equal(ra.support, rb.support) and np.array_equal(ra.query, rb.query)
    plain = EpisodeBuilder(cfg, "train", seed=0, sources=["objects", "textures"], augment=False).build(1)
    aug = a.build(1)
    assert plain.support_keys == aug.support_keys and not np.array_equal(plain.support, aug.support)



def test_pixels_are_normalised_on_the_target_device():
    """uint8 pixels travel to the device, and the float32 conversion and normalisation happen there: the
    CPU result is the reference arithmetic, and a non-CPU device (meta, as a stand-in for a GPU) gets a
    float32 NCHW tensor on that device without any float32 copy on the CPU."""
    batch = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cpu = to_tensor(batch, mean, std)
    ref = (torch.from_numpy(batch).permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(cpu.double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(to_tensor(batch, mean, std, device="cpu"), cpu)
    meta = to_tensor(batch, mean, std, device="meta")
    assert meta.device.type == "meta" and meta.dtype == torch.float32 and tuple(meta.shape) == (3, 3, 5, 4)
