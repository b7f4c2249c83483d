"""Programmatic image artifacts for ShapeWorld renders, and the independent "artifact rate" measure.

Every corruption is a pure function ``f(img, rng, strength=None) -> img``: ``img`` is an HxWx3 uint8 array (a
render), ``rng`` a ``numpy.random.Generator`` (the only source of randomness), ``strength`` in [0, 1] (drawn
from ``rng`` when None); the input is never modified and the output is a new HxWx3 uint8 array.

- ``hf_noise``: per-pixel Gaussian noise (high-frequency grain), sigma 0.10-0.30 of the range;
- ``color_blotches``: 2-5 soft discs of random off-palette colours;
- ``smear``: a directional (motion) blur, 5-10 px long, over the whole image or a band of it;
- ``fragment``: shapes broken into pieces: background-coloured cuts through them and a few displaced blocks;
- ``oversaturate``: a colour cast amplified by a saturation boost and a contrast stretch, then clipped (how
  over-guided samples look: burnt, tinted backgrounds and blown-out colours).

``is_artifact(stats)`` turns ``detector.artifact_stats(img)`` into a yes/no with thresholds chosen so that clean
renders are 0% artifacts while every corruption is flagged far more often: off-palette pixel fraction > 0.08,
or unexplained foreground > 0.05, or more than 2 speckles (see ``ARTIFACT_THRESHOLDS``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .world import BACKGROUND, COLORS

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), np.float32) / 255.0

# artifact_stats thresholds (the "artifact rate" of an image set is the fraction flagged by is_artifact).
# On 2,000 clean renders (render_batch seed 0, all tasks) off_palette (anti-aliased edges) has median 0.016 and
# max 0.058; unexplained and speckle are 0 on every one, so any thresholds above those give 0% on clean renders.
# Within that range the speckle and unexplained thresholds are set where the corruptions' detection rates barely
# move (400 renders each, random strength: hf_noise 95%, color_blotches 88%, smear 80%, fragment 86%,
# oversaturate 77%) while one or two specks of colour bleeding inside an object (common in the shipped base
# model's samples, ~17% flagged on 48 of them) do not count on their own.
ARTIFACT_THRESHOLDS = {"off_palette": 0.08, "unexplained": 0.05, "speckle": 2.0}


def is_artifact(stats: dict, thresholds: dict | None = None) -> bool:
    """An image is an artifact when any ``artifact_stats`` measurement exceeds its threshold."""
    t = {**ARTIFACT_THRESHOLDS, **(thresholds or {})}
    return bool(stats["off_palette"] > t["off_palette"] or stats["unexplained"] > t["unexplained"]
                or stats["speckle"] > t["speckle"])


def artifact_rate(images, thresholds: dict | None = None) -> float:
    """Fraction of images (HxWx3 uint8) that ``is_artifact`` flags, measured with ``detector.artifact_stats``."""
    from .detector import artifact_stats

    images = list(images)
    if not images:
        raise ValueError("artifact_rate needs at least one image")
    return float(np.mean([is_artifact(artifact_stats(np.asarray(im)), thresholds) for im in images]))


# ------------------------------------------------------------------------------------------- helpers
def _check(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"corruptions expect an HxWx3 image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"corruptions expect a uint8 image, got dtype {a.dtype}")
    return a.astype(np.float32) / 255.0


def _out(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _strength(rng: np.random.Generator, strength: float | None) -> float:
    if strength is None:
        return float(rng.uniform())
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return float(strength)


def _off_palette_color(rng: np.random.Generator, min_dist: float = 0.45) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance in [0,1] units) from every palette colour."""
    for _ in range(1000):
        c = rng.uniform(0, 1, 3).astype(np.float32)
        if np.sqrt(((_PALETTE - c) ** 2).sum(1)).min() > min_dist:
            return c
    return np.array([0.0, 0.0, 0.0], np.float32)  # black is far from all of them


# ------------------------------------------------------------------------------------------- corruptions
def hf_noise(img, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    x = _check(img)
    s = _strength(rng, strength)
    sigma = 0.10 + 0.20 * s
    return _out(x + rng.normal(0.0, sigma, x.shape).astype(np.float32))


def color_blotches(img, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    x = _check(img)
    s = _strength(rng, strength)
    H, W = x.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    for _ in range(2 + int(round(3 * s))):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        r = rng.uniform(0.08, 0.12 + 0.08 * s) * H
        alpha = rng.uniform(0.7, 1.0)
        m = np.clip(r + 0.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0, 1)[..., None] * alpha  # soft edge
        x = x * (1 - m) + _off_palette_color(rng) * m
    return _out(x)


def smear(img, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    from scipy import ndimage

    x = _check(img)
    s = _strength(rng, strength)
    H, W = x.shape[:2]
    length = 5 + int(round(5 * s))
    ang = rng.uniform(0, np.pi)
    k = np.zeros((2 * length + 1,) * 2, np.float32)
    for t in np.linspace(-length, length, 8 * length + 1):  # a line kernel through the centre
        k[int(round(length + t * np.sin(ang))), int(round(length + t * np.cos(ang)))] = 1.0
    k /= k.sum()
    blurred = np.stack([ndimage.convolve(x[..., c], k, mode="nearest") for c in range(3)], -1)
    if rng.uniform() < 0.5:  # smear a band only (a streak), else the whole image
        axis = rng.integers(2)
        lo = int(rng.integers(0, H // 2))
        band = np.zeros((H, W, 1), np.float32)
        if axis == 0:
            band[lo:lo + H // 2] = 1
        else:
            band[:, lo:lo + W // 2] = 1
        return _out(x * (1 - band) + blurred * band)
    return _out(blurred)


def fragment(img, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    x = _check(img).copy()
    s = _strength(rng, strength)
    H, W = x.shape[:2]
    bg = np.array(BACKGROUND, np.float32) / 255.0
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    fg = np.abs(x - bg).sum(-1) > 0.15
    ys, xs = np.nonzero(fg)
    # cuts: background-coloured lines through foreground points
    for _ in range(2 + int(round(3 * s))):
        if len(ys):
            i = rng.integers(len(ys))
            py, px = float(ys[i]), float(xs[i])
        else:
            py, px = rng.uniform(0, H), rng.uniform(0, W)
        ang = rng.uniform(0, np.pi)
        d = np.abs((yy - py) * np.cos(ang) - (xx - px) * np.sin(ang))
        width = rng.uniform(0.8, 1.5 + 1.0 * s)
        m = np.clip(width - d, 0, 1)[..., None]
        x = x * (1 - m) + bg * m
    # displaced blocks: copy a few foreground blocks a few pixels away
    src = x.copy()
    for _ in range(1 + int(round(2 * s))):
        b = int(rng.integers(4, 8))
        if len(ys):
            i = rng.integers(len(ys))
            y0, x0 = int(np.clip(ys[i] - b // 2, 0, H - b)), int(np.clip(xs[i] - b // 2, 0, W - b))
        else:
            y0, x0 = int(rng.integers(0, H - b)), int(rng.integers(0, W - b))
        dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
        y1, x1 = int(np.clip(y0 + dy, 0, H - b)), int(np.clip(x0 + dx, 0, W - b))
        x[y1:y1 + b, x1:x1 + b] = src[y0:y0 + b, x0:x0 + b]
    return _out(x)


def oversaturate(img, rng: np.random.Generator, strength: float | None = None) -> np.ndarray:
    x = _check(img)
    s = _strength(rng, strength)
    direction = rng.normal(size=3).astype(np.float32)
    direction -= direction.mean()  # a hue cast, not a brightness change
    direction /= np.linalg.norm(direction) + 1e-8
    x = x + (0.15 + 0.15 * s) * direction
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    sat = 2.0 + 2.0 * s
    x = luma[..., None] + sat * (x - luma[..., None])
    contrast = 1.2 + 0.6 * s
    x = 0.5 + contrast * (x - 0.5)
    return _out(x)


CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "hf_noise": hf_noise,
    "color_blotches": color_blotches,
    "smear": smear,
    "fragment": fragment,
    "oversaturate": oversaturate,
}


def corrupt(img, rng: np.random.Generator, kind: str | None = None,
            strength: float | None = None) -> tuple[np.ndarray, str]:
    """One corruption (``kind``, or a random one) of ``img``; returns (image, kind)."""
    if kind is None:
        kind = list(CORRUPTIONS)[int(rng.integers(len(CORRUPTIONS)))]
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[kind](img, rng, strength), kind
