"""The held-out ShapeWorld judge: a second detector designed apart from ``detector.py``, for evaluation only.

NEVER use it as a training reward: it is not registered in ``flowalign.rewards``, and no shipped config may
reward it. It exists so that a gain measured on generated images is not a policy learning the training judge's
own leniency; a judge that is also the reward can be learned.

What it shares with ``detector.py``: the background colour, the palette (names, and the hue and chroma ratio of
each colour) and the GenEval rules (``geneval.judge``). Everything else is different:

- **segmentation** by distance from the background, not by palette colour: every pixel farther than
  ``FG_DIST`` from the background is foreground, and each 4-connected foreground component is one candidate,
  whatever its colours (a two-tone shape stays one object; a colour between two palette colours does not
  split it);
- **colour** by hue, not nearest RGB: mixing a colour with the grey background keeps its hue and its ratio
  chroma / distance-from-background, so each pixel gets the palette colour of nearest hue, and is *clean* when
  its hue lies within ``HUE_SHARE`` of the way to the midpoint with the neighbouring palette hue and its ratio
  within ``RATIO_TOL`` of that colour's (olive, the mix of red and green, has the hue of orange but a third of
  its ratio);
- **shape** from the geometry of a soft coverage map, not template overlap: fill of the box, convex-hull
  solidity, the 3rd and 4th Fourier harmonics of the radial profile (a corner count: a triangle has three
  lobes, a square four at the diagonals, a cross four on the axes), the profile's spread, vertical skewness
  (a triangle's apex), and aspect ratio; the class is the nearest prototype in units of per-feature
  tolerances, prototypes measured on renders of every shape at every size the world draws;
- **merges** are split: a component of several clean colours that is not itself a confident shape is cut
  into its colour pieces, and a one-colour component that erosion separates into two cores is cut at the
  neck; every piece of a cut is flagged ``merged``.

The lenient verdict counts every candidate that is a shape at all (nearest-prototype distance below
``MAX_DIST``). The strict verdict (``geneval.judge(..., strict=True)``) counts a candidate only when it is
``unambiguous``: not a piece of a cut, its distance below ``STRICT_DIST`` and the runner-up's at least
``STRICT_RATIO`` times farther; and for a clause that names a colour, ``color_clear`` too: at least
``STRICT_COLOR`` of its core pixels cleanly of that colour. (A two-tone square is clearly a square, not clearly
red.)

``detect(img) -> list[GeoDetection]``; ``score_images(metadata, images, strict=False)`` as in ``geneval``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .world import BACKGROUND, COLORS, SHAPES

FG_DIST = 100.0        # foreground: RGB distance from the background above this (half the palette's nearest)
MIN_AREA = 0.008       # smallest candidate, fraction of the image
HUE_SHARE, RATIO_TOL = 0.75, 0.25
MAX_DIST = 4.0         # lenient: a candidate farther than this from every prototype is no shape
STRICT_DIST, STRICT_RATIO, STRICT_COLOR = 2.0, 1.5, 0.8
N_RAYS = 48
FEATURES = ("fill", "solidity", "a4", "t3", "spread", "skew", "aspect")  # the order of ``features``' vector
# tolerance per feature (the unit of the prototype distance): how far a drawn shape may stray and still be it.
# Fill and solidity get the widest: they move most with the soft, rounded corners of generated shapes at 32 px
# (0.06 and 0.05 at first; widened after looking at the base model's gold-set images, see docs/judging.md)
TOLERANCE = np.array([0.1, 0.07, 0.035, 0.035, 0.035, 0.2, 0.1])

_BG = np.array(BACKGROUND, np.float64)
_NAMES = list(COLORS)


def _hue_chroma(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees and chroma (max - min) of RGB values (..., 3)."""
    mx, mn = a.max(-1), a.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return h * 60.0, c


_PAL = np.array(list(COLORS.values()), np.float64)
_PAL_HUE, _PAL_CHROMA = _hue_chroma(_PAL)
_PAL_RATIO = _PAL_CHROMA / np.linalg.norm(_PAL - _BG, axis=1)


def _hue_tolerances() -> np.ndarray:
    """Per palette colour, the clean hue range on each side: ``HUE_SHARE`` of the way to the midpoint with the
    neighbouring palette hue on that side (so orange, 21 degrees from yellow, is narrow, and green, 74 and 99
    degrees from its neighbours, is wide)."""
    o = np.argsort(_PAL_HUE)
    h = _PAL_HUE[o]
    up = (np.roll(h, -1) - h) % 360
    down = (h - np.roll(h, 1)) % 360
    tol = np.zeros((len(h), 2))
    tol[o, 0], tol[o, 1] = HUE_SHARE * down / 2, HUE_SHARE * up / 2
    return tol


_HUE_TOL = _hue_tolerances()


def pixel_colours(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the palette colour of nearest hue, and whether the pixel is cleanly that colour."""
    h, c = _hue_chroma(a)
    dist = np.linalg.norm(a - _BG, axis=-1)
    signed = (h[..., None] - _PAL_HUE + 180) % 360 - 180
    idx = np.abs(signed).argmin(-1)
    off = np.take_along_axis(signed, idx[..., None], -1)[..., 0]
    tol = _HUE_TOL[idx, (off > 0).astype(int)]
    ratio = c / np.maximum(dist, 1e-6)
    clean = (np.abs(off) <= tol) & (np.abs(ratio - _PAL_RATIO[idx]) <= RATIO_TOL) & (c > 25)
    return idx, clean


@dataclass
class GeoDetection:
    cls: str
    color: str
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]
    centroid: tuple[float, float]            # x, y in [0, 1]
    area: float                              # soft area, fraction of the image
    score: float                             # 1 / (1 + prototype distance): higher is surer
    dist: float                              # standardized distance to the nearest prototype
    runner_up: str
    ratio: float                             # runner-up's distance / nearest distance
    color_share: float                       # share of core pixels cleanly of ``color``
    merged: bool                             # a piece cut out of a merged component
    unambiguous: bool
    color_clear: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _solidity(m: np.ndarray) -> float:
    """Area over convex-hull area of the mask after a 2x2 opening (one-pixel horns at a generated square's corners
    would otherwise inflate the hull; a cross's arms, >= 3 px wide, survive the opening)."""
    opened = ndimage.binary_opening(m, np.ones((2, 2), bool))
    m = opened if opened.sum() >= 0.5 * m.sum() else m
    ys, xs = np.nonzero(m)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    try:
        return float(len(xs) / ConvexHull(pts).volume)
    except QhullError:
        return 0.0


_THETA = np.linspace(0, 2 * np.pi, N_RAYS, endpoint=False)


def features(alpha: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Geometry of one object from its soft coverage ``alpha`` (zero outside it) and its binary ``mask``."""
    area = alpha.sum()
    if area < 4:
        return None
    H, W = alpha.shape
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    cy, cx = (alpha * yy).sum() / area, (alpha * xx).sum() / area
    w_s, h_s = alpha.max(0).sum(), alpha.max(1).sum()
    fill = area / max(w_s * h_s, 1e-6)
    # radial profile: coverage integrated along rays from the centroid (sub-pixel, bilinear)
    step = 0.25
    t = np.arange(step / 2, 1.6 * max(w_s, h_s) + 2, step)
    xs = cx - 0.5 + np.cos(_THETA)[:, None] * t[None]
    ys = cy - 0.5 - np.sin(_THETA)[:, None] * t[None]
    r = ndimage.map_coordinates(alpha, [ys.ravel(), xs.ravel()], order=1, mode="constant").reshape(xs.shape)
    r = r.sum(1) * step
    rho = r / max(r.mean(), 1e-6)
    a4 = float(np.mean(rho * np.cos(4 * _THETA)))
    t3 = float(np.mean(rho * -np.sin(3 * _THETA)))  # a lobe straight up (an apex) and two at the base corners
    spread = float(rho.std())
    var = (alpha * (yy - cy) ** 2).sum() / area
    skew = float((alpha * (yy - cy) ** 3).sum() / area / max(var, 1e-6) ** 1.5)
    return np.array([fill, _solidity(mask), a4, t3, spread, skew, h_s / max(w_s, 1e-6)])


@lru_cache(maxsize=1)
def prototypes() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Mean feature vector of each shape over renders at the world's sizes and sub-pixel positions."""
    from .world import IMAGE_SIZE, MANY_SCALE, R_MAX, R_MIN, render

    rng = np.random.default_rng(0)
    out = {}
    for s in SHAPES:
        fs = []
        for k in range(24):
            r = np.linspace(R_MIN * MANY_SCALE, R_MAX, 24)[k]
            x, y = 0.5 + rng.uniform(-0.03, 0.03, 2)
            img = np.asarray(render([{"shape": s, "color": _NAMES[k % len(_NAMES)], "x": x, "y": y, "r": r}],
                                    IMAGE_SIZE), np.float64)
            cand = _candidates(img, split=False)
            fs.append(cand[0][2])
        out[s] = np.mean(fs, 0)
    return np.stack([out[s] for s in SHAPES]), out


def classify(f: np.ndarray) -> tuple[str, float, str, float]:
    """(shape, distance, runner-up, runner-up's distance) by standardized distance to the prototypes."""
    P, _ = prototypes()
    d = np.sqrt((((f[None] - P) / TOLERANCE) ** 2).mean(1))
    o = np.argsort(d)
    return SHAPES[o[0]], float(d[o[0]]), SHAPES[o[1]], float(d[o[1]])


def _alpha(a: np.ndarray, dist: np.ndarray, mask: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Soft coverage of the object whose core pixels are ``mask``: distance from the background over the
    object's full-colour distance, inside its 1-pixel dilation (restricted to ``allowed``)."""
    full = np.percentile(dist[mask], 90)
    region = ndimage.binary_dilation(mask) & allowed
    return np.clip(dist / max(full, 1e-6), 0, 1) * region


def _pieces_by_colour(mask, idx, clean, min_px) -> list[np.ndarray]:
    out = []
    for ci in np.unique(idx[mask & clean]):
        comp, n = ndimage.label(mask & clean & (idx == ci))
        for j in range(1, n + 1):
            p = comp == j
            if p.sum() >= min_px:
                out.append(p)
    return out


def _pieces_by_neck(mask, min_px) -> list[np.ndarray]:
    """Cut a one-colour component at its necks: erode until it falls apart into >= 2 big cores, then give each
    pixel to its nearest core."""
    core = mask
    for _ in range(3):
        core = ndimage.binary_erosion(core)
        comp, n = ndimage.label(core)
        sizes = ndimage.sum(core, comp, range(1, n + 1)) if n else []
        big = [j + 1 for j, sz in enumerate(sizes) if sz >= max(2, min_px // 4)]
        if len(big) >= 2:
            seeds = np.isin(comp, big) * comp
            _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            owner = seeds[iy, ix] * mask
            return [owner == j for j in big if (owner == j).sum() >= min_px]
        if n == 0:
            break
    return []


def _candidates(a: np.ndarray, split: bool = True) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """(alpha, mask, features, merged) of every object candidate in an image (float HxWx3). ``split``: cut
    components that are not confident shapes (off only while the prototypes themselves are measured)."""
    H, W = a.shape[:2]
    min_px = int(np.ceil(MIN_AREA * H * W))
    dist = np.linalg.norm(a - _BG, axis=-1)
    fg = dist > FG_DIST
    idx, clean = pixel_colours(a)
    comp, n = ndimage.label(fg)
    out = []
    for j in range(1, n + 1):
        m = comp == j
        if m.sum() < min_px:
            continue
        allowed = (comp == j) | (comp == 0)
        al = _alpha(a, dist, m, allowed)
        f = features(al, m)
        if f is None:
            continue
        pieces = []
        if split and not _confident(*classify(f)):
            cols = [p for p in _pieces_by_colour(m, idx, clean, min_px)]
            pieces = cols if len(cols) >= 2 else _pieces_by_neck(m, min_px)
        if len(pieces) >= 2:
            for p in pieces:
                others = m & ~p
                pal = _alpha(a, dist, p, allowed & ~others)
                pf = features(pal, p)
                if pf is not None:
                    out.append((pal, p, pf, True))
        else:
            out.append((al, m, f, False))
    return out


def _confident(cls, d, runner, d2) -> bool:
    return d <= STRICT_DIST and d2 >= STRICT_RATIO * d


def detect(img) -> list[GeoDetection]:
    """img: HxWx3 uint8 array (or PIL image)."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ValueError(f"geometry_judge.detect expects an HxWx3 image, got shape {a.shape}")
    a = a[..., :3].astype(np.float64)
    H, W = a.shape[:2]
    idx, clean = pixel_colours(a)
    out = []
    for al, m, f, merged in _candidates(a):
        cls, d, runner, d2 = classify(f)
        if d > MAX_DIST:
            continue
        core = m & (al > 0.6)
        core = core if core.any() else m
        ci = np.bincount(idx[core], minlength=len(_NAMES)).argmax()
        share = float((clean[core] & (idx[core] == ci)).mean())
        ys, xs = np.nonzero(m)
        area = al.sum()
        yy, xx = np.mgrid[0:H, 0:W] + 0.5
        ratio = d2 / max(d, 1e-6)
        out.append(GeoDetection(
            cls=cls, color=_NAMES[ci],
            bbox=(xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H),
            centroid=(float((al * xx).sum() / area) / W, float((al * yy).sum() / area) / H),
            area=float(area / (H * W)), score=round(1 / (1 + d), 3), dist=round(d, 3), runner_up=runner,
            ratio=round(ratio, 3), color_share=round(share, 3), merged=merged,
            unambiguous=bool(not merged and _confident(cls, d, runner, d2)),
            color_clear=share >= STRICT_COLOR))
    return out


def score_images(metadata, images, strict: bool = False) -> dict:
    """GenEval verdicts of this judge (lenient or strict), in ``geneval.score_images``'s format."""
    from flowalign.eval.geneval import score_images as _score

    return _score(metadata, images, detect, strict=strict)
