"""Every ShapeWorld verdict of a set of images, side by side: the training judge, its strict verdict, the held-out
judge and its strict verdict, with standard errors and per-image agreement.

- ``train``: ``shapeworld.detector`` + the GenEval rules, the lenient verdict: what the ``shapeworld`` reward pays
  for and what every number before the judging issue used;
- ``train_strict``: the same detections, counting only unambiguous objects (``geneval.judge(strict=True)``);
- ``heldout``: ``shapeworld.geometry_judge``, a detector of a different design, never a training reward;
- ``heldout_strict``: its strict verdict. **The headline judge** (``HEADLINE``): gains are reported on it, the
  others stand beside it.

``V2_JUDGES`` (``train_v2``, ``train_v2_strict``): the training judge's version 2 (``shapeworld.detector_v2``, the
``shapeworld`` reward with ``version: 2``), lenient and strict. Not part of ``evaluate``'s verdicts; ``verdicts``
and ``gold_accuracy`` give them with ``v2=True`` (``benchmarks/judge_agreement.py --gold-only``).

Standard errors: binomial per task, ``sqrt(p (1 - p) / n)``; the overall score is the unweighted mean of the
tasks, so its SE is ``sqrt(sum_t se_t^2) / n_tasks``. Agreement between two judges is the fraction of images on
which their verdicts are equal, per task and overall (the unweighted mean of the tasks, like the scores).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .geneval import judge

JUDGES = ("train", "train_strict", "heldout", "heldout_strict")
V2_JUDGES = ("train_v2", "train_v2_strict")
GOLD_ROWS = ("heldout_strict", "heldout", "train_strict", "train")  # format_gold_table's default rows
HEADLINE = "heldout_strict"
AGREEMENT_PAIRS = (("train", "heldout"), ("train_strict", "heldout_strict"), ("train", "train_strict"),
                   ("heldout", "heldout_strict"))


def verdicts(meta: dict, img, v2: bool = False) -> dict[str, tuple[bool, float]]:
    """(correct, partial) of one image under every judge (one detection pass per detector); ``v2`` adds
    ``V2_JUDGES``."""
    from flowalign.shapeworld import detector, geometry_judge

    img = np.asarray(img)
    d, g = detector.detect(img), geometry_judge.detect(img)
    out = {"train": judge(meta, d), "train_strict": judge(meta, d, strict=True),
           "heldout": judge(meta, g), "heldout_strict": judge(meta, g, strict=True)}
    if v2:
        from flowalign.shapeworld import detector_v2

        d2 = detector_v2.detect(img)
        out.update(train_v2=judge(meta, d2), train_v2_strict=judge(meta, d2, strict=True))
    return out


def summarize_judge(tags: Sequence[str], correct: Sequence[bool]) -> dict:
    """Per-task accuracy, overall (mean of tasks) and their standard errors."""
    by: dict[str, list[bool]] = {}
    for t, c in zip(tags, correct):
        by.setdefault(t, []).append(bool(c))
    per_task = {t: float(np.mean(v)) for t, v in by.items()}
    se = {t: math.sqrt(p * (1 - p) / len(by[t])) for t, p in per_task.items()}
    k = len(per_task)
    return {"per_task": per_task, "overall": float(np.mean(list(per_task.values()))) if k else float("nan"),
            "se_per_task": se, "se_overall": math.sqrt(sum(s * s for s in se.values())) / k if k else float("nan"),
            "n_per_task": {t: len(v) for t, v in by.items()}}


def agreement(tags: Sequence[str], a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Fraction of images on which two judges' verdicts are equal, per task and overall (mean of tasks)."""
    by: dict[str, list[bool]] = {}
    for t, x, y in zip(tags, a, b):
        by.setdefault(t, []).append(bool(x) == bool(y))
    per_task = {t: float(np.mean(v)) for t, v in by.items()}
    return {"per_task": per_task, "overall": float(np.mean(list(per_task.values()))) if per_task else float("nan"),
            "n_disagree": int(sum(not v for vs in by.values() for v in vs))}


def judge_all(metadata: Sequence[dict], images: Sequence) -> dict:
    """All verdicts of ShapeWorld images. Returns ``{"per_image": [{"tag", "prompt", "correct", "partial",
    "verdicts": {judge: bool}}], "judges": {judge: summarize_judge(...)}, "agreement": {"a_vs_b": agreement(...)}}``
    where ``correct``/``partial`` are the training judge's lenient ones (what ``geneval.score_images`` gives)."""
    if len(metadata) != len(images):
        raise ValueError(f"got {len(metadata)} metadata records but {len(images)} images")
    per_image = []
    for meta, img in zip(metadata, images):
        v = verdicts(meta, img)
        per_image.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": v["train"][0],
                          "partial": v["train"][1], "verdicts": {j: bool(v[j][0]) for j in JUDGES}})
    return summarize_all(per_image)


def summarize_all(per_image: list[dict]) -> dict:
    """``judges`` and ``agreement`` of per-image records that carry ``verdicts``."""
    tags = [r["tag"] for r in per_image]
    col = {j: [r["verdicts"][j] for r in per_image] for j in JUDGES}
    return {"per_image": per_image, "judges": {j: summarize_judge(tags, col[j]) for j in JUDGES},
            "agreement": {f"{a}_vs_{b}": agreement(tags, col[a], col[b]) for a, b in AGREEMENT_PAIRS}}


# ------------------------------------------------------------------------------------------ gold set
GOLD_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gold"  # in a source checkout


def load_gold(directory=GOLD_DIR) -> tuple[list[dict], np.ndarray]:
    """The hand-labelled gold set: ``gold.jsonl`` records (``metadata``, ``gold`` verdict, ``unsure``, ``source``,
    ...) and ``images.npz`` (uint8 N x 32 x 32 x 3, record ``id`` = row)."""
    directory = Path(directory)
    jl, npz = directory / "gold.jsonl", directory / "images.npz"
    for f in (jl, npz):
        if not f.is_file():
            raise FileNotFoundError(f"gold set file not found: {f}")
    recs = [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    images = np.load(npz)["images"]
    if len(recs) != len(images) or [r["id"] for r in recs] != list(range(len(recs))):
        raise ValueError(f"{directory}: gold.jsonl ids must be 0..{len(images) - 1}, one per image")
    return recs, images


def gold_accuracy(records: Sequence[dict], images: Sequence, v2: bool = False) -> dict:
    """Each judge's agreement with the hand verdicts: per task, overall (unweighted mean of the tasks), the number
    of images, false accepts (judge yes, gold no) and false refusals (judge no, gold yes). ``v2`` adds
    ``V2_JUDGES``."""
    rows = [verdicts(r["metadata"], im, v2=v2) for r, im in zip(records, images)]
    out = {}
    for j in JUDGES + (V2_JUDGES if v2 else ()):
        by: dict[str, list[bool]] = {}
        fa = fr = 0
        for r, v in zip(records, rows):
            ok = bool(v[j][0])
            by.setdefault(r["metadata"]["tag"], []).append(ok == bool(r["gold"]))
            fa += ok and not r["gold"]
            fr += r["gold"] and not ok
        per_task = {t: float(np.mean(x)) for t, x in by.items()}
        out[j] = {"per_task": per_task, "overall": float(np.mean(list(per_task.values()))), "n": len(records),
                  "false_accept": int(fa), "false_refuse": int(fr)}
    return out


def format_gold_table(acc: dict, tasks: Sequence[str] | None = None, judges: Sequence[str] = GOLD_ROWS) -> str:
    """Markdown table of ``gold_accuracy``: one row per judge of ``judges`` (default: the four, headline first),
    accuracy per task and overall, then false accepts and false refusals out of n."""
    from .benchmark import TASK_ORDER

    tasks = [t for t in (tasks or TASK_ORDER) if t in acc["train"]["per_task"]]
    lines = ["| judge | " + " | ".join(tasks) + " | overall | false accepts | false refusals | n |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for j in judges:
        a = acc[j]
        lines.append(f"| {j} | " + " | ".join(f"{a['per_task'][t]:.3f}" for t in tasks)
                     + f" | **{a['overall']:.3f}** | {a['false_accept']} | {a['false_refuse']} | {a['n']} |")
    return "\n".join(lines)
