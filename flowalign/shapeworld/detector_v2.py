"""Version 2 of the training judge: ``detector.py``'s palette labelling and template IoU, without its colour
fragmentation.

``detect(image) -> list[DetectionV2]``, a drop-in for ``detector.detect`` (same fields, plus ``colors`` and
``share``). Selected as a reward with ``rewards: {shapeworld: {weight: 1.0, version: 2}}``; version 1
(``detector.py``) stays the default and is unchanged.

Why: ``detector.py`` labels each pixel with its nearest palette colour and takes each one-colour connected
component as a candidate. A shape drawn in a colour between two palette colours (the models draw orange at hue
~24, between red and orange, and blue-purple) gets a core of one label and a rim or patches of the other, so one
object becomes two fragments of two colours, each a poor or wrong shape.

What v2 does, in the training judge's own terms (pixel labels, fragments, templates):

1. the same pixel labels (``detector.label_pixels``) and one-colour 4-connected *fragments* of every size;
2. **merging**: two 4-adjacent groups of fragments merge when their colours together are at most two palette
   colours that are *neighbours* on the palette ring (the palette is listed in hue order: red, orange, yellow,
   green, blue, purple, and back to red) and the union fits the templates better than the two parts do: its
   *fit*, area x best template IoU, exceeds the sum of the parts' fits (a part too small, too thin or too
   elongated to be a candidate fits 0). The best-gaining pair merges first, until no merge gains. Two touching
   objects of neighbouring colours stay apart (their union matches no template as well as each does), and a
   red/green two-tone shape stays two fragments (red and green are not neighbours), as in version 1;
3. the group's colour is the palette colour (of its own colours) nearest in RGB to the mean of its inner
   pixels (the group eroded once, so edges mixed with the background do not count);
4. the fit used for merging matches **aspect-preserving templates**: the group's box and the templates' are
   padded to a square before resampling to the common grid (version 1's grid stretches every box to a square,
   so half of a square, a 2:1 rectangle, would fit the square template as well as the whole square does);
5. the shape is version 1's: the template of best soft IoU on version 1's (stretched) grid. A group that is a
   single fragment of version 1 gets version 1's shape and score.

Strict verdict: version 1's tests (``detector.STRICT``: margin, purity / other colour in the box, solidity,
aspect, contact) measured on the merged group, where the group's colours count as its own. In addition
``color_clear`` needs ``share`` >= ``STRICT_V2["share"]``: the fraction of the group's pixels labelled its
colour (a merged group of two neighbouring colours in nearly equal parts is clearly a shape but not clearly
either colour). Version 1's thresholds are kept as they are; the share threshold comes from renders (clean, and
blur + noise), never from generated images (docs/judging.md, "Training judge v2").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from . import detector as v1
from .world import COLORS, SHAPES, render

_NAMES = list(COLORS)
_PALETTE = v1._PALETTE        # index 0 = background, 1.. = COLORS in order
_GRID = v1._GRID
_K = len(_NAMES)
# palette ring (COLORS is listed in hue order): index i (1-based palette index) neighbours i-1 and i+1, cyclically
NEIGHBOURS = {frozenset((i + 1, (i + 1) % _K + 1)) for i in range(_K)}
_TEMPLATES: dict[str, np.ndarray] = {}
_CROSS = ndimage.generate_binary_structure(2, 1)

# colour share below which a group's colour is not clear: on clean renders every group's share is 1.0; under blur
# 0.5 + noise 8 the minimum is 0.924 (docs/judging.md, "Training judge v2"); just below it
STRICT_V2 = {"share": 0.9}


@dataclass
class DetectionV2(v1.Detection):
    colors: tuple[str, ...] = ()   # the palette colours of the merged fragments (its own colour first)
    share: float = 1.0             # fraction of its pixels labelled its colour


def _square_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The square box of side max(h, w) centred on a box (y0, y1, x0, x1); may extend outside the image."""
    y0, y1, x0, x1 = box
    s = max(y1 - y0, x1 - x0)
    cy, cx = y0 + (y1 - y0 - s) // 2, x0 + (x1 - x0 - s) // 2
    return cy, cy + s, cx, cx + s


def _to_grid(coverage: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop a coverage map to the square around a box (zeros outside the image) and resample to the grid."""
    y0, y1, x0, x1 = _square_box(box)
    H, W = coverage.shape
    crop = np.zeros((y1 - y0, x1 - x0), np.float32)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = coverage[sy0:sy1, sx0:sx1]
    im = Image.fromarray((crop * 255).astype(np.uint8))
    return np.asarray(im.resize((_GRID, _GRID), Image.BILINEAR), np.float32) / 255


def templates() -> dict[str, np.ndarray]:
    """Each shape rendered at 64 px, its coverage cropped to the square around its tight box."""
    if not _TEMPLATES:
        for s in SHAPES:
            im = np.asarray(render([{"shape": s, "color": "red", "x": 0.5, "y": 0.5, "r": 0.5}], size=64, supersample=4))
            cov = v1._coverage(im, COLORS["red"])
            ys, xs = np.nonzero(cov > 0.5)
            _TEMPLATES[s] = _to_grid(cov, (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
    return _TEMPLATES


class _Scene:
    """Fragments of one image and the template scores of groups of them."""

    def __init__(self, img: np.ndarray, min_area: float, max_aspect: float):
        self.img = img
        H, W = img.shape[:2]
        self.lab, _ = v1.label_pixels(img)
        self.min_px, self.max_aspect = min_area * H * W, max_aspect
        self.frag = np.zeros(self.lab.shape, np.int32)  # fragment id per pixel (0 = background)
        self.frag_color: list[int] = [0]
        for ci in range(1, len(_PALETTE)):
            comp, n = ndimage.label(self.lab == ci)
            if n:
                self.frag[comp > 0] = comp[comp > 0] + len(self.frag_color) - 1
                self.frag_color += [ci] * n
        self.n_frag = len(self.frag_color) - 1
        self.tpl = templates()  # aspect-preserving (merging); the shape uses v1.templates()
        self._cache: dict[frozenset, dict | None] = {}

    def adjacent_pairs(self) -> set[frozenset]:
        f = self.frag
        pairs = set()
        for a, b in ((f[:, :-1], f[:, 1:]), (f[:-1, :], f[1:, :])):
            m = (a > 0) & (b > 0) & (a != b)
            pairs |= {frozenset((int(x), int(y))) for x, y in zip(a[m], b[m])}
        return pairs

    def colour_of(self, mask: np.ndarray, colours: set[int]) -> int:
        if len(colours) == 1:
            return next(iter(colours))
        inner = ndimage.binary_erosion(mask, _CROSS)
        px = np.asarray(self.img, np.float32)[..., :3][inner if inner.any() else mask]
        cands = sorted(colours)
        return cands[int(np.linalg.norm(_PALETTE[cands] - px.mean(0), axis=1).argmin())]

    def evaluate(self, group: frozenset) -> dict | None:
        """Template match of a group of fragments, or None when it is not a candidate."""
        if group in self._cache:
            return self._cache[group]
        m = np.isin(self.frag, list(group))
        area = int(m.sum())
        res = None
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if area >= self.min_px and min(h, w) >= 3 and max(h, w) / min(h, w) <= self.max_aspect:
            colours = {self.frag_color[i] for i in group}
            ci = self.colour_of(m, colours)
            cov = v1._coverage(self.img, _PALETTE[ci]) * ndimage.binary_dilation(m)
            box = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
            g = v1._to_grid(cov, box)  # version 1's grid (the box stretched to a square): the shape
            ious = {s: v1._soft_iou(g, t) for s, t in v1.templates().items()}
            g = _to_grid(cov, box)     # the aspect-preserving grid: how whole the group is (merging)
            whole = max(v1._soft_iou(g, t) for t in self.tpl.values())
            res = {"mask": m, "area": area, "ys": ys, "xs": xs, "h": h, "w": w, "ci": ci, "colours": colours,
                   "ious": ious, "score": max(ious.values()), "whole": whole}
        self._cache[group] = res
        return res

    def fit(self, group: frozenset) -> float:
        """Area x aspect-preserving template IoU (0 when the group is not a candidate)."""
        r = self.evaluate(group)
        return r["area"] * r["whole"] if r else 0.0


def _mergeable(colours: set[int]) -> bool:
    return len(colours) == 1 or (len(colours) == 2 and frozenset(colours) in NEIGHBOURS)


def groups(sc: _Scene) -> list[frozenset]:
    """Greedy agglomeration of adjacent fragments (module docstring, step 2)."""
    of = {i: frozenset((i,)) for i in range(1, sc.n_frag + 1)}  # fragment -> its current group
    frag_pairs = sc.adjacent_pairs()
    while True:
        best, best_gain = None, 0.0
        for p in {frozenset((of[a], of[b])) for a, b in frag_pairs if of[a] != of[b]}:
            ga, gb = tuple(p)
            if not _mergeable({sc.frag_color[i] for i in ga | gb}):
                continue
            gain = sc.fit(ga | gb) - sc.fit(ga) - sc.fit(gb)
            if gain > best_gain + 1e-9:
                best, best_gain = (ga, gb), gain
        if best is None:
            break
        u = best[0] | best[1]
        for i in u:
            of[i] = u
    return list(dict.fromkeys(of.values()))


def detect(img, min_area: float = 0.008, min_iou: float = 0.55, max_aspect: float = 2.2) -> list[DetectionV2]:
    """img: HxWx3 uint8 array (or PIL image). Same arguments as ``detector.detect``."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"detect expects an HxWx3 image, got shape {img.shape}")
    H, W = img.shape[:2]
    sc = _Scene(img, min_area, max_aspect)
    lab, fg = sc.lab, sc.lab > 0
    out: list[DetectionV2] = []
    for grp in groups(sc):
        r = sc.evaluate(grp)
        if r is None or r["score"] < min_iou:
            continue
        ious, m, ys, xs, ci = r["ious"], r["mask"], r["ys"], r["xs"], r["ci"]
        best = max(ious, key=ious.get)
        runner = max((s for s in ious if s != best), key=ious.get)
        own = np.isin(lab, list(r["colours"]))
        ring = ndimage.binary_dilation(m, iterations=2) & fg
        y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
        touch = ndimage.binary_dilation(m) & fg & ~m
        meas = dict(margin=round(ious[best] - ious[runner], 3), purity=round(r["area"] / max(int(ring.sum()), 1), 3),
                    other_in_box=round(float((fg & ~own)[y0:y1, x0:x1].sum()) / r["area"], 3),
                    contact=int(touch.sum()), solidity=round(v1._solidity(m), 3),
                    aspect=round(max(r["h"], r["w"]) / min(r["h"], r["w"]), 3))
        flags = v1.strict_flags(best, **meas)
        share = round(float((lab[m] == ci).mean()), 3)
        cols = tuple(_NAMES[c - 1] for c in sorted(r["colours"], key=lambda c: c != ci))
        out.append(DetectionV2(cls=best, color=_NAMES[ci - 1],
                               bbox=(xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H),
                               centroid=(float(xs.mean() + 0.5) / W, float(ys.mean() + 0.5) / H),
                               area=r["area"] / (H * W), score=round(ious[best], 3), runner_up=runner, **meas,
                               flags=flags, unambiguous=not flags,
                               color_clear="colour" not in flags and share >= STRICT_V2["share"],
                               colors=cols, share=share))
    return out
