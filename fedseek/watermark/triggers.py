"""The secret trigger set a key expands to: smooth random images or tabular points with random labels."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fedseek.watermark.keys import WatermarkKey

DOMAIN = b"fedseek-watermark"  # domain separation of every hash derived from a key


def _rng(key: WatermarkKey, purpose: str) -> np.random.Generator:
    """A numpy Generator for one purpose, seeded from SHA-256(domain | version | purpose | seed)."""
    digest = hashlib.sha256(DOMAIN + b"|" + key.version.encode() + b"|" + purpose.encode() + b"|" + key.seed).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) for an image input shape (H, W) or (C, H, W)."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return shape[0], shape[1], shape[2]


def _upsample(low: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour upsampling of (..., h0, w0) to (..., h, w)."""
    rows = (np.arange(h) * low.shape[-2]) // h
    cols = (np.arange(w) * low.shape[-1]) // w
    return low[..., rows[:, None], cols[None, :]]


def _smooth(img: np.ndarray, passes: int) -> np.ndarray:
    """Cheap separable 3-tap box blur over the last two axes, `passes` times (edge-padded)."""
    for _ in range(passes):
        p = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
        img = (p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]) / 3.0
        img = (img[..., :, :-2] + img[..., :, 1:-1] + img[..., :, 2:]) / 3.0
    return img


def _image_triggers(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded abstract images in [0, 1]: noise, blocky noise or gratings, plus a secret sparse stamp."""
    c, h, w = _image_dims(shape)
    # Secret stamp shared by all triggers: ~8% of pixels forced to secret 0/1 values.
    stamp_mask = rng.random((c, h, w)) < 0.08
    stamp_vals = (rng.random((c, h, w)) < 0.5).astype(np.float64)
    kinds = rng.integers(0, 3, size=n)
    out = np.empty((n, c, h, w), dtype=np.float64)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        kind = int(kinds[i])
        if kind == 0:  # uniform noise
            img = rng.random((c, h, w))
        elif kind == 1:  # blocky noise: random low-resolution grid upsampled
            bh = int(rng.integers(2, max(3, h // 2 + 1)))
            bw = int(rng.integers(2, max(3, w // 2 + 1)))
            img = _upsample(rng.random((c, bh, bw)), h, w)
        else:  # oriented grating with random frequency / phase, plus noise
            theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w) * 2 + phase)
            img = 0.5 + 0.4 * wave[None] + 0.15 * rng.standard_normal((c, h, w))
        out[i] = np.where(stamp_mask, stamp_vals, img)
    out = np.clip(out, 0.0, 1.0)
    return out.reshape((n, *shape))


def _tabular_triggers(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Uniform[-4, 4] records (standardized units) with a secret sparse pattern of extreme values."""
    x = rng.uniform(-4.0, 4.0, size=(n, d))
    k = d // 10  # ~10% of the features; none below 10 features (each trigger needs free coordinates)
    idx = rng.choice(d, size=k, replace=False)
    vals = rng.choice([-1.0, 1.0], size=k) * rng.uniform(3.5, 4.0, size=k)
    x[:, idx] = vals
    return x


def trigger_set(key: WatermarkKey) -> tuple[torch.Tensor, torch.Tensor]:
    """The key's triggers: inputs (n, *input_shape) float32 and labels (n,) int64 uniform on {0..K-1}."""
    n = key.n_triggers
    rng_x = _rng(key, "inputs")
    if key.is_image:
        x = _image_triggers(rng_x, n, key.input_shape)
    else:
        x = _tabular_triggers(rng_x, n, key.input_shape[0]).reshape((n, *key.input_shape))
    y = _rng(key, "labels").integers(0, key.num_classes, size=n)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def _synthetic_inputs(rng: np.random.Generator, n: int, shape: tuple[int, ...], is_image: bool) -> torch.Tensor:
    """In-distribution-like inputs without data: N(0, 1) records, or smooth random blobs in [0, 1]."""
    if not is_image:
        return torch.from_numpy(rng.standard_normal((n, *shape)).astype(np.float32))
    c, h, w = _image_dims(shape)
    low = rng.random((n, c, max(2, h // 2), max(2, w // 2)))
    img = _smooth(_upsample(low, h, w), passes=1)
    # contrast stretch so blobs look like strokes on a dark background, per image
    gain = rng.uniform(4.0, 10.0, size=(n, 1, 1, 1))
    thr = rng.uniform(0.45, 0.65, size=(n, 1, 1, 1))
    img = 1.0 / (1.0 + np.exp(-gain * (img - thr)))
    return torch.from_numpy(img.reshape((n, *shape)).astype(np.float32))
