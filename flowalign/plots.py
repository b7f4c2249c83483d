"""Matplotlib PNGs written beside a run: the reward curve and base-vs-trained scores per task."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reward_curve(metrics_path, out_path, evals: list[dict] | None = None) -> Path:
    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "reward_mean" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if recs:
        it = np.array([r["iteration"] for r in recs])
        r = np.array([r["reward_mean"] for r in recs])
        ax.plot(it, r, color="#9ab", lw=1, label="train reward (per iteration)")
        k = max(1, len(r) // 20)
        if len(r) >= k:
            ax.plot(it[k - 1:], np.convolve(r, np.ones(k) / k, mode="valid"), color="#136", lw=2,
                    label=f"moving mean ({k})")
    if evals:
        ax.plot([e["iteration"] for e in evals], [e["overall"] for e in evals], "o-", color="#c40",
                label="held-out judge (overall)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)  # below: never over the data
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def compare_bars(columns: dict[str, dict], out_path, title: str = "") -> Path:
    """columns: name -> result with per_task and overall; grouped bars per task."""
    tasks = [t for t in next(iter(columns.values()))["per_task"]] + ["overall"]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(columns)
    for j, (name, res) in enumerate(columns.items()):
        vals = [res["per_task"].get(t, np.nan) if t != "overall" else res["overall"] for t in tasks]
        bars = ax.bar(np.arange(len(tasks)) + j * w - 0.4 + w / 2, vals, w, label=name)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("judge accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
