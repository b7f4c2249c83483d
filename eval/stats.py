"""Scores, deltas and their standard errors for model comparisons.

Conventions (the same as ``eval.judges`` for binary verdicts):

- a task's score is the mean of its per-image scores x_1..x_n (0/1 verdicts or continuous scores); its standard
  error is ``sqrt(mean((x - mean(x))^2) / n)`` -- for 0/1 verdicts exactly the binomial ``sqrt(p (1 - p) / n)``;
- the overall score is the unweighted mean of the T tasks; tasks hold different images, so its SE is
  ``sqrt(sum_t se_t^2) / T``;
- the delta of model B against model A on a task is ``mean(x_B) - mean(x_A)``. When both models scored the **same
  records** (same prompts, same noise seeds: ``paired``), the SE is that of the per-image differences
  ``d_i = x_B,i - x_A,i``: ``sqrt(mean((d - mean(d))^2) / n)``, which equals ``sqrt(se_A^2 + se_B^2 - 2 cov / n)``
  (cov the population covariance of x_A and x_B): shared noises make the images correlated, and the paired SE is
  smaller than the unpaired ``sqrt(se_A^2 + se_B^2)`` whenever the scores agree more than chance. Without matched
  records the unpaired SE is used. The overall delta's SE combines the tasks as above.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_se(x: Sequence[float]) -> tuple[float, float]:
    """(mean, SE) of per-image scores (population variance, module docstring); (nan, nan) when empty."""
    a = np.asarray(list(x), np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(math.sqrt(a.var() / a.size))


def summarize_scores(tags: Sequence[str], scores: Sequence[float], tasks: Sequence[str] | None = None) -> dict:
    """Per-task mean and SE, overall (mean of tasks) and its SE, n per task. ``tasks`` fixes the order."""
    by: dict[str, list[float]] = {}
    for t, s in zip(tags, scores):
        by.setdefault(t, []).append(float(s))
    order = [t for t in (tasks or []) if t in by] + [t for t in by if t not in (tasks or [])]
    per_task, se = {}, {}
    for t in order:
        per_task[t], se[t] = mean_se(by[t])
    k = len(per_task)
    return {"per_task": per_task, "se_per_task": se, "n_per_task": {t: len(by[t]) for t in order},
            "overall": float(np.mean(list(per_task.values()))) if k else float("nan"),
            "se_overall": math.sqrt(sum(s * s for s in se.values())) / k if k else float("nan")}


def delta(a: Sequence[float], b: Sequence[float], paired: bool) -> dict:
    """Delta b - a of two samples of per-image scores with its SE (paired: same records, same order)."""
    a = np.asarray(list(a), np.float64)
    b = np.asarray(list(b), np.float64)
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"paired delta needs samples of the same size, got {a.size} and {b.size}")
        d = b - a
        return {"delta": float(d.mean()), "se": float(math.sqrt(d.var() / d.size)), "paired": True, "n": int(d.size)}
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return {"delta": mb - ma, "se": math.sqrt(sa * sa + sb * sb), "paired": False, "n": int(min(a.size, b.size))}


def compare(tags_a: Sequence[str], a: Sequence[float], keys_a: Sequence, tags_b: Sequence[str], b: Sequence[float],
            keys_b: Sequence, tasks: Sequence[str] | None = None) -> dict:
    """Per-task and overall delta (b - a) with SEs. Records are matched by ``keys`` (e.g. (prompt, noise seed));
    when the two key lists are equal the deltas are paired, otherwise unpaired. Returns ``{"per_task": {t: {delta,
    se, paired, n}}, "overall": delta, "se_overall": se, "paired": bool}``."""
    paired = list(keys_a) == list(keys_b) and list(tags_a) == list(tags_b)
    by_a: dict[str, list[float]] = {}
    by_b: dict[str, list[float]] = {}
    for t, x in zip(tags_a, a):
        by_a.setdefault(t, []).append(float(x))
    for t, x in zip(tags_b, b):
        by_b.setdefault(t, []).append(float(x))
    common = [t for t in (tasks or by_a) if t in by_a and t in by_b] + \
             [t for t in by_a if t in by_b and t not in (tasks or by_a)]
    per_task = {t: delta(by_a[t], by_b[t], paired) for t in common}
    k = len(per_task)
    return {"per_task": per_task, "paired": paired,
            "overall": float(np.mean([v["delta"] for v in per_task.values()])) if k else float("nan"),
            "se_overall": math.sqrt(sum(v["se"] ** 2 for v in per_task.values())) / k if k else float("nan")}
