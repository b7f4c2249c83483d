"""The four ShapeWorld verdicts on clean renders, and on renders with Gaussian blur 0.5 + noise sigma 8 (the
perturbation tests/test_shapeworld.py uses). usage: python benchmarks/judges_on_renders.py [--n 2400] [--n-noisy 600]
[--versions 1,2] (``--versions 1,2`` adds the training judge's version 2, ``train_v2`` and ``train_v2_strict``)"""
from __future__ import annotations

import argparse

import numpy as np

from flowalign.eval.benchmark import TASK_ORDER
from flowalign.eval.judges import summarize_judge, verdicts
from flowalign.shapeworld.world import blur_and_noise, render_batch


def table(imgs, metas, v2: bool = False) -> str:
    v = [verdicts(m, im, v2=v2) for m, im in zip(metas, imgs)]
    tags = [m["tag"] for m in metas]
    lines = ["| judge | " + " | ".join(TASK_ORDER) + " | overall |", "|---|" + "---|" * (len(TASK_ORDER) + 1)]
    for j in ("heldout_strict", "heldout", "train_strict", "train") + (("train_v2_strict", "train_v2") if v2 else ()):
        s = summarize_judge(tags, [x[j][0] for x in v])
        lines.append(f"| {j} | " + " | ".join(f"{s['per_task'][t]:.3f}" for t in TASK_ORDER) + f" | **{s['overall']:.4f}** |")
    return "\n".join(lines)


def share_line(imgs) -> str:
    """The colour share (``detector_v2``) of every detection: the basis of ``STRICT_V2["share"]``."""
    from flowalign.shapeworld import detector_v2

    sh = np.array([d.share for im in imgs for d in detector_v2.detect(im)])
    return (f"train_v2 colour share over {len(sh)} detections: min {sh.min():.3f}, 1st percentile "
            f"{np.percentile(sh, 1):.3f} (threshold {detector_v2.STRICT_V2['share']})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--n-noisy", type=int, default=600)
    ap.add_argument("--versions", default="1", help="training judge versions: 1 or 1,2")
    a = ap.parse_args()
    vers = {v.strip() for v in a.versions.split(",")}
    if not vers <= {"1", "2"} or "1" not in vers:
        ap.error(f"--versions must be 1 or 1,2, got {a.versions!r}")
    v2 = "2" in vers
    imgs, metas = render_batch(a.n, seed=123)
    print(f"clean renders (render_batch({a.n}, seed=123)):\n\n{table(imgs, metas, v2)}\n")
    if v2:
        print(share_line(imgs) + "\n")
    imgs, metas = render_batch(a.n_noisy, seed=7)
    noisy = blur_and_noise(imgs)
    print(f"blur 0.5 + noise 8 (render_batch({a.n_noisy}, seed=7)):\n\n{table(noisy, metas, v2)}")
    if v2:
        print("\n" + share_line(noisy))


if __name__ == "__main__":
    main()
