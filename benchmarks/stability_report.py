"""Proxy, judge and artifact rate over training: for each run directory, the base model and every checkpoint
(``checkpoints/iter_*``, full fine-tuning runs) are scored on the same held-out test prompts with the same noises
(``hacking_report.measure``: the proxy reward's mean, the exact judges -- training judge, strict, held-out strict --
and the independently measured artifact rate). Reward hacking shows as the proxy climbing while the judge falls
and the artifact rate rises; a stable method keeps the three together.

usage: python benchmarks/stability_report.py runs/hack_shapeclip runs/hack_shapeclip_pref [--proxy shapeclip]
           [--n-per-task 50] [--guidance 3.0] [--out runs/stability]
Writes ``stability.json``, ``stability.md`` and ``stability.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hacking_report import measure  # noqa: E402

from flowalign.checkpoint import load_weights  # noqa: E402
from flowalign.eval.benchmark import benchmark_metadata, subsample  # noqa: E402
from flowalign.pipelines.base import load_adapter  # noqa: E402
from flowalign.shapeworld import MODEL_DIR  # noqa: E402


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    out = []
    for d in sorted((run / "checkpoints").glob("iter_*")):
        if (d / "model.safetensors").is_file():
            out.append((int(d.name.split("_")[1]), d))
    return out


def load_at(model_dir, ckpt: Path):
    adapter = load_adapter(model_dir)
    weights = load_weights(ckpt)
    if any("lora" in k for k in weights):
        raise SystemExit(f"{ckpt}: a LoRA checkpoint; this report reads full fine-tuning checkpoints")
    missing, unexpected = adapter.denoiser.load_state_dict(weights, strict=False)
    if unexpected or len(weights) == 0:
        raise SystemExit(f"{ckpt}: weights do not match the model ({len(unexpected)} unexpected keys)")
    return adapter


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, pts) in enumerate(report["runs"].items()):
        its = [p["iteration"] for p in pts]
        c = f"C{i}"
        axes[0].plot(its, [p["proxy_mean"] for p in pts], marker="o", color=c, label=name)
        axes[1].plot(its, [p["judges_overall"]["heldout_strict"] for p in pts], marker="o", color=c,
                     label=f"{name}: held-out strict")
        axes[1].plot(its, [p["judge_overall"] for p in pts], ls="--", color=c, alpha=0.6,
                     label=f"{name}: training judge")
        axes[2].plot(its, [p["artifact_rate"] for p in pts], marker="o", color=c, label=name)
    for ax, t in zip(axes, (f"proxy reward ({report['proxy']}), mean", "judge, overall (test prompts)",
                            "artifact rate (exact measure)")):
        ax.set_title(t)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--benchmark", default="shapeworld-geneval")
    ap.add_argument("--proxy", default="shapeclip")
    ap.add_argument("--n-per-task", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/stability")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowalign.rewards import build_reward

    proxy = build_reward(args.proxy)
    metas = subsample(benchmark_metadata(args.benchmark), args.n_per_task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, _ = measure(load_adapter(args.model), metas, args, proxy)
    report = {"proxy": args.proxy, "n_per_task": args.n_per_task, "guidance": args.guidance, "steps": args.steps,
              "runs": {}}
    for run in map(Path, args.runs):
        pts = [dict(base, iteration=0)]
        for it, ck in checkpoints(run):
            row, _ = measure(load_at(args.model, ck), metas, args, proxy)
            pts.append(dict(row, iteration=it))
            print(f"{run.name} iter {it}: proxy {row['proxy_mean']:.4g}  held-out strict "
                  f"{row['judges_overall']['heldout_strict']:.3f}  training judge {row['judge_overall']:.3f}  "
                  f"artifacts {row['artifact_rate']:.3f}", flush=True)
        report["runs"][run.name] = pts
    (out / "stability.json").write_text(json.dumps(report, indent=1))
    lines = ["| run | iteration | proxy mean | held-out strict | training judge | artifact rate |",
             "|---|---|---|---|---|---|"]
    for name, pts in report["runs"].items():
        for p in pts:
            lines.append(f"| {name} | {p['iteration']} | {p['proxy_mean']:.3f} | "
                         f"{p['judges_overall']['heldout_strict']:.3f} | {p['judge_overall']:.3f} | "
                         f"{p['artifact_rate']:.3f} |")
    md = (f"# Stability over training ({args.benchmark}, {args.n_per_task} prompts per task, {args.steps} steps, "
          f"CFG {args.guidance})\n\n" + "\n".join(lines) + "\n")
    (out / "stability.md").write_text(md)
    plot(report, out / "stability.png")
    print(md)
    return report


if __name__ == "__main__":
    main()
