"""The four ShapeWorld verdicts on clean renders, and on renders with Gaussian blur 0.5 + noise sigma 8 (the
perturbation tests/test_shapeworld.py uses). usage: python benchmarks/judges_on_renders.py [--n 2400] [--n-noisy 600]"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageFilter

from flowalign.eval.benchmark import TASK_ORDER
from flowalign.eval.judges import JUDGES, summarize_judge, verdicts
from flowalign.shapeworld.world import render_batch


def table(imgs, metas) -> str:
    v = [verdicts(m, im) for m, im in zip(metas, imgs)]
    tags = [m["tag"] for m in metas]
    lines = ["| judge | " + " | ".join(TASK_ORDER) + " | overall |", "|---|" + "---|" * (len(TASK_ORDER) + 1)]
    for j in ("heldout_strict", "heldout", "train_strict", "train"):
        s = summarize_judge(tags, [x[j][0] for x in v])
        lines.append(f"| {j} | " + " | ".join(f"{s['per_task'][t]:.3f}" for t in TASK_ORDER) + f" | **{s['overall']:.4f}** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--n-noisy", type=int, default=600)
    a = ap.parse_args()
    imgs, metas = render_batch(a.n, seed=123)
    print(f"clean renders (render_batch({a.n}, seed=123)):\n\n{table(imgs, metas)}\n")
    rng = np.random.default_rng(0)
    imgs, metas = render_batch(a.n_noisy, seed=7)
    noisy = []
    for im in imgs:
        b = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.5)))
        noisy.append(np.clip(b.astype(np.float32) + rng.normal(0, 8, b.shape), 0, 255).astype(np.uint8))
    print(f"blur 0.5 + noise 8 (render_batch({a.n_noisy}, seed=7)):\n\n{table(noisy, metas)}")


if __name__ == "__main__":
    main()
