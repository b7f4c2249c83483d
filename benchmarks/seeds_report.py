"""The main job over seeds: base vs trained per run directory, on the headline judge (the held-out judge's strict
verdict, each model at its best CFG scale of the run's grid) with standard errors, the training judge (also the
reward) beside it, the unseen split, and whether each seed clears the noise.

A gain counts when it clears about two standard errors (SE of a difference of two independent scores:
sqrt(se_base^2 + se_trained^2)) in every seed; a task "falls" when it drops by more than its SE.

usage: python benchmarks/seeds_report.py runs/main_s0 runs/main_s1 [--target 0.15] [--out report.md]
       [--plot deltas.png]
A run may be given as LABEL=DIR (the label names its row and its bar). ``--plot`` draws each run's headline gain
with its 2-SE interval against zero and the target.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load(run_dir) -> dict:
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        raise SystemExit(f"seeds_report: no results.json in {run_dir} (is the run finished?)")
    return json.loads(p.read_text())


def se_diff(a: float, b: float) -> float:
    return math.sqrt(a * a + b * b)


def row(name: str, res: dict, target: float) -> tuple[str, bool]:
    b, t = res["base"]["test"], res["final"]["test"]
    d = t["overall"] - b["overall"]
    se = se_diff(b.get("se_overall") or 0.0, t.get("se_overall") or 0.0)
    fell = []
    for task in TASKS:
        if task in t["per_task"]:
            n = t["judges"]["train"]["n_per_task"][task] if "judges" in t else 100
            pb, pt = b["per_task"][task], t["per_task"][task]
            s = se_diff(math.sqrt(pb * (1 - pb) / n), math.sqrt(pt * (1 - pt) / n))
            if pt - pb < -s:
                fell.append(f"{task} {pt - pb:+.2f}")
    tr_b = b["judges"]["train"]["overall"] if "judges" in b else float("nan")
    tr_t = t["judges"]["train"]["overall"] if "judges" in t else float("nan")
    ub, ut = res["base"].get("unseen", {}).get("overall"), res["final"].get("unseen", {}).get("overall")
    unseen = f"{ub:.3f} -> {ut:.3f}" if ub is not None and ut is not None else "–"
    ok = d > 2 * se and not fell
    line = (f"| {name} | CFG {b.get('guidance')} / {t.get('guidance')} | {b['overall']:.3f} | {t['overall']:.3f} | "
            f"{d:+.3f} ± {se:.3f} | {'yes' if d > 2 * se else 'no'} | {'yes' if d >= target else 'no'} | "
            f"{', '.join(fell) or 'none'} | {unseen} | {tr_b:.3f} -> {tr_t:.3f} |")
    return line, ok


def delta(res: dict) -> tuple[float, float]:
    """The headline gain and its SE (of a difference of two independent scores)."""
    b, t = res["base"]["test"], res["final"]["test"]
    return t["overall"] - b["overall"], se_diff(b.get("se_overall") or 0.0, t.get("se_overall") or 0.0)


def plot(named: list[tuple[str, dict]], target: float, path) -> None:
    """A horizontal bar per run: the headline gain, its 2-SE interval, zero and the target as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = [delta(res) for _, res in named]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(named) + 1.4))
    y = list(range(len(named)))[::-1]
    ax.errorbar([d for d, _ in ds], y, xerr=[2 * se for _, se in ds], fmt="o", color="tab:blue", capsize=3,
                label="gain ± 2 SE")
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(target, color="tab:red", ls="--", lw=1, label=f"target +{target:.2f}")
    ax.set_yticks(y, [n for n, _ in named])
    ax.set_xlabel("headline gain over the base (held-out judge, strict verdict)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--target", type=float, default=0.15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of every run's gain with its 2-SE interval")
    a = ap.parse_args(argv)
    lines = ["| run | best CFG base / trained | base | trained | Δ ± SE | > 2 SE | ≥ target | tasks falling > SE "
             "| unseen (base -> trained) | training judge (reward) |", "|---|---|---|---|---|---|---|---|---|---|"]
    oks, named = [], []
    for r in a.runs:
        label, _, d = r.partition("=") if "=" in r else ("", "", r)
        res = load(d)
        named.append((label or Path(d).name, res))
        line, ok = row(named[-1][0], res, a.target)
        lines.append(line)
        oks.append(ok)
    lines.append("")
    lines.append(f"Headline: held-out judge, strict verdict, n = 100 per task. A gain in every seed: "
                 f"{'yes' if all(oks) else 'no'} ({sum(oks)}/{len(oks)} runs clear 2 SE with no task falling).")
    text = "\n".join(lines)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.plot:
        plot(named, a.target, a.plot)
    print(text)
    return text


if __name__ == "__main__":
    main()
