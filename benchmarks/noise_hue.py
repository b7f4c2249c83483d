"""Colour drift of inference-time alignment where the prompt names no colour: the palette colour of every foreground
pixel (``shapeworld.detector.label_pixels``: nearest ShapeWorld colour within 90 RGB units, else background) of
the saved samples of a ``benchmarks/noise_opt.py`` run, for the colour-free tasks (single_object, two_object,
counting), per method.

    python benchmarks/noise_hue.py runs/noise_opt [runs/noise_opt_s1 ...]

Prints, per run and method, the share of foreground pixels of each colour (pooled over the images of the
colour-free tasks) and the share of images whose most frequent foreground colour is yellow or orange.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

FREE = ("single_object", "two_object", "counting")
METHODS = ("base", "bon_shapeclip", "reno_shapeclip", "carinox", "fk_shapeclip")


def colour_shares(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pooled share of foreground pixels per palette colour (len(COLORS),), per-image dominant colour index or -1
    for an image without foreground)."""
    from flowalign.shapeworld.detector import label_pixels
    from flowalign.shapeworld.world import COLORS

    n = len(COLORS)
    total = np.zeros(n)
    dom = []
    for img in images:
        lab, _ = label_pixels(img)
        c = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
        total += c
        dom.append(int(c.argmax()) if c.sum() else -1)
    return total / max(total.sum(), 1), np.asarray(dom)


def run(d: Path) -> str:
    from flowalign.shapeworld.world import COLORS

    names = list(COLORS)
    yo = [names.index("yellow"), names.index("orange")]
    lines = [f"{d}: colour-free tasks ({', '.join(FREE)}), share of foreground pixels per colour; last column: "
             "images whose dominant colour is yellow or orange", "",
             "| method | n images | " + " | ".join(names) + " | yellow+orange pixels | yellow/orange-dominant images |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for m in METHODS:
        f, j = d / f"images_{m}.npy", d / f"{m}.json"
        if not (f.is_file() and j.is_file()):
            continue
        tags = json.loads(j.read_text())["tags"]
        keep = np.asarray([t in FREE for t in tags])
        share, dom = colour_shares(np.load(f)[keep])
        lines.append(f"| {m} | {int(keep.sum())} | " + " | ".join(f"{s:.3f}" for s in share)
                     + f" | {share[yo].sum():.3f} | {np.isin(dom, yo).mean():.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for a in sys.argv[1:] or ["runs/noise_opt"]:
        print(run(Path(a)) + "\n")
