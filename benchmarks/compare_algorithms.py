"""Every algorithm on the shipped ShapeWorld base with the same prompts, the same number of generated images and
their wall-clock minutes: the judge on held-out prompts every ``--eval-every`` iterations, one line per algorithm.

Each config runs through the one trainer with the same ``run.seed`` (so the same prompt lists: the prompt stream
is keyed by seed and iteration), ``--iterations`` iterations of prompts_per_iter x group_size images, evaluated at
one CFG scale (``--guidance``, the base's best: 3) on the test prompts (n = ``--n-per-task`` per task). Minutes are
training wall-clock (evaluation excluded). Writes ``compare.md`` (table) and ``compare.png`` (headline judge, the
held-out strict verdict, solid; the training judge, which is also the reward, dashed) in ``--out``.

usage: python benchmarks/compare_algorithms.py [section.key=value ...] --out runs/compare
       [--iterations 140 --eval-every 35 --seed 0] [--configs configs/a.yaml configs/b.yaml ...]
(overrides go before the options: after --configs they would be read as config files)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["configs/shapeworld_flow_grpo.yaml", "configs/shapeworld_nft.yaml", "configs/shapeworld_awm.yaml"]


def curves(run_dir: Path, upto: int | None = None) -> dict:
    """(images, minutes, headline, train) per evaluation of a finished run directory (up to iteration ``upto``: a
    longer finished run is compared at the same number of images)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    per_iter = cfg["sample"]["prompts_per_iter"] * cfg["sample"]["group_size"]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    minutes, acc, cpu = {0: 0.0}, 0.0, 0.0
    for r in recs:
        if upto is not None and r["iteration"] > upto:
            break
        acc += r["iter_s"] / 60
        cpu = cpu + r["iter_cpu_s"] / 60 if "iter_cpu_s" in r and cpu == cpu else float("nan")
        minutes[r["iteration"]] = acc
    out = {"images": [], "minutes": [], "headline": [], "train": [], "se": [], "algorithm": cfg["algorithm"]["name"],
           "cpu_minutes": cpu}
    for line in (run_dir / "evals.jsonl").read_text().splitlines():
        e = json.loads(line)
        if upto is not None and e["iteration"] > upto:
            continue
        t = e["test"]
        out["images"].append(e["iteration"] * per_iter)
        out["minutes"].append(minutes.get(e["iteration"], acc))
        out["headline"].append(t["overall"])
        out["se"].append(t.get("se_overall") or 0.0)
        out["train"].append(t["judges"]["train"]["overall"] if "judges" in t else float("nan"))
    return out


def report(runs: dict[str, dict], out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| run | algorithm | images | train minutes (wall) | CPU minutes | held-out strict (headline) | Δ vs base | "
             "training judge (reward) | Δ |", "|---|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in runs.items():
        for ax, x in zip(axes, ("images", "minutes")):
            line, = ax.plot(c[x], c["headline"], marker="o", label=name.removeprefix("shapeworld_"))
            ax.plot(c[x], c["train"], ls="--", color=line.get_color(), alpha=0.5)
        cpu = "–" if c["cpu_minutes"] != c["cpu_minutes"] else f"{c['cpu_minutes']:.1f}"
        lines.append(f"| {name} | {c['algorithm']} | {c['images'][-1]} | {c['minutes'][-1]:.1f} | {cpu} | "
                     f"{c['headline'][-1]:.3f} ± {c['se'][-1]:.3f} | {c['headline'][-1] - c['headline'][0]:+.3f} | "
                     f"{c['train'][-1]:.3f} | {c['train'][-1] - c['train'][0]:+.3f} |")
    for ax, x in zip(axes, ("images generated", "training minutes")):
        ax.set_xlabel(x)
        ax.set_ylabel("overall score, held-out test prompts")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("ShapeWorld: same prompts, same images, one trainer (solid: held-out strict judge, the headline; "
                 "dashed: training judge, the reward)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "compare.png", dpi=110)
    table = "\n".join(lines)
    (out / "compare.md").write_text(table + "\n")
    return table


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT)
    ap.add_argument("--iterations", type=int, default=140)
    ap.add_argument("--eval-every", type=int, default=35)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every config")
    a = ap.parse_args(argv)
    import torch

    from flowalign.config import load_config
    from flowalign.trainer import Trainer

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    from flowalign.config import ConfigError

    for path in a.configs:  # every config (and the overrides) must load before anything runs
        try:
            load_config(path, [f"run.output_dir={out / Path(path).stem}", *a.overrides])
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in a.configs:
        name = Path(path).stem
        run_dir = out / name
        done = (run_dir / "results.json").is_file() and \
            json.loads((run_dir / "results.json").read_text()).get("iterations", 0) >= a.iterations
        if not done:  # finished runs (as long or longer) are reused: a killed comparison continues
            if run_dir.exists():  # an unfinished one (no checkpoints are kept) starts again
                shutil.rmtree(run_dir)
            cfg = load_config(path, [f"train.iterations={a.iterations}", f"eval.every={a.eval_every}",
                                     f"eval.guidance={a.guidance}", f"eval.n_per_task={a.n_per_task}",
                                     "data.eval_unseen=null", f"run.seed={a.seed}", f"run.output_dir={run_dir}",
                                     "run.checkpoint_every=0", "run.resume=false", *a.overrides])
            Trainer(cfg).run()
        runs[name] = curves(run_dir, a.iterations)
    table = report(runs, out)
    print(table)
    return table


if __name__ == "__main__":
    main()
