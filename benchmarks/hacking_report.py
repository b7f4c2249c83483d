"""Reward-hacking report: base model vs runs trained on a hackable reward (``--proxy``: the learned ``shapeclip``
by default, or e.g. ``jpeg_incompressibility``), with or without the ``artifact`` penalty, judged by the exact
ShapeWorld judge and an independent artifact measure.

For the base model and every run directory (its ``final/`` weights: LoRA via ``pipe.load_lora_weights`` or a full
``final/transformer``), on the held-out test prompts with the same per-record noises (``eval.benchmark.evaluate``):
- the exact judge's accuracy per task and overall (GenEval rules + exact detector);
- the proxy reward (``--proxy``) mean over the generated images;
- the artifact rate: the fraction of images that ``flowalign.shapeworld.artifacts.is_artifact`` flags from
  ``detector.artifact_stats`` (off-palette pixel fraction > 0.08, or unexplained foreground > 0.05, or more than
  2 speckles; thresholds chosen so clean renders are 0% artifacts, see ``ARTIFACT_THRESHOLDS``);
- the learned artifact reward mean when its weights are present (reported, never used to define the rate).
Hacking shows up as the proxy going up while the judge stays flat or drops and the artifact rate rises.

usage: python benchmarks/hacking_report.py runs/hack_shapeclip runs/hack_shapeclip_artifact \
           [--proxy shapeclip] [--model DIR] [--n-per-task 100] [--steps 20] [--guidance 3.0] [--out runs/hacking_report]
Writes ``hacking_report.json``, ``hacking_report.md`` and ``hacking_report.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from flowalign.eval.benchmark import TASK_ORDER, benchmark_metadata, evaluate, format_table, subsample
from flowalign.pipelines.base import load_adapter
from flowalign.shapeworld import MODEL_DIR
from flowalign.shapeworld.artifacts import ARTIFACT_THRESHOLDS, is_artifact
from flowalign.shapeworld.detector import artifact_stats


def load_run(model_dir, run_dir):
    """The base adapter with a run's final weights applied (LoRA or a full transformer)."""
    adapter = load_adapter(model_dir)
    adapter.load_trained(Path(run_dir) / "final")
    return adapter


def measure(adapter, metas, args, proxy, artifact=None) -> tuple[dict, np.ndarray]:
    res, images = evaluate(adapter, metas, args.steps, args.guidance, args.seed, args.batch_size, progress=True)
    prompts = [m["prompt"] for m in metas]
    with torch.no_grad():
        proxy_scores = proxy(list(images), prompts)["reward"].numpy()
        art = artifact(list(images), prompts)["reward"].numpy() if artifact is not None else None
    stats = [artifact_stats(im) for im in images]
    flags = np.array([is_artifact(s) for s in stats], float)
    tags = [m["tag"] for m in metas]
    row = {
        "judge_overall": res["overall"],
        "judge_per_task": res["per_task"],
        "proxy_mean": float(proxy_scores.mean()),
        "proxy_per_task": {t: float(proxy_scores[[x == t for x in tags]].mean()) for t in dict.fromkeys(tags)},
        "artifact_rate": float(flags.mean()),
        "artifact_rate_per_task": {t: float(flags[[x == t for x in tags]].mean()) for t in dict.fromkeys(tags)},
        "off_palette_mean": float(np.mean([s["off_palette"] for s in stats])),
        "unexplained_mean": float(np.mean([s["unexplained"] for s in stats])),
        "speckle_mean": float(np.mean([s["speckle"] for s in stats])),
        "n_images": len(images),
    }
    if "judges" in res:  # every verdict: the training judge (lenient, above), its strict one, the held-out judge's
        row["judges_overall"] = {j: r["overall"] for j, r in res["judges"].items()}
        row["agreement_train_vs_heldout"] = res["agreement"]["train_vs_heldout"]["overall"]
    if art is not None:
        row["artifact_reward_mean"] = float(art.mean())
    return row, images


def plot(rows: dict, path: Path, proxy: str = "shapeclip") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    tasks = [t for t in TASK_ORDER if any(t in r["judge_per_task"] for r in rows.values())]
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        axes[0].bar(np.arange(len(tasks)) + i * w, [rows[n]["judge_per_task"].get(t, np.nan) for t in tasks], w,
                    label=n)
    axes[0].set_xticks(np.arange(len(tasks)) + 0.4 - w / 2, tasks, rotation=30, ha="right")
    axes[0].set_title("exact judge accuracy per task")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(names), frameon=False)
    for ax, key, title in [(axes[1], "judge_overall", "exact judge (overall)"),
                           (axes[2], "proxy_mean", f"proxy reward: {proxy} (mean)"),
                           (axes[3], "artifact_rate", "artifact rate (artifact_stats)")]:
        ax.bar(names, [rows[n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for j, n in enumerate(names):
            ax.text(j, rows[n][key], f"{rows[n][key]:.4g}", ha="center", va="bottom", fontsize=8)
    axes[3].set_ylim(0, 1.1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories (each with final/)")
    ap.add_argument("--model", default=str(MODEL_DIR), help="the base model (default: the shipped ShapeWorld model)")
    ap.add_argument("--benchmark", default="shapeworld-geneval")
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--proxy", default="shapeclip",
                    help="the reward the runs were trained on, reported as 'proxy' (any registry name; default shapeclip)")
    ap.add_argument("--shapeclip", default=None, help="shapeclip weights (default: the shipped ones)")
    ap.add_argument("--artifact", default=None,
                    help="learned artifact reward weights (default: the shipped ones, if present; 'none': skip it)")
    ap.add_argument("--out", default="runs/hacking_report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-json", default=None, help="redraw the .md/.png of an existing hacking_report.json")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report.setdefault("proxy", "shapeclip")
        write_outputs(report, Path(args.from_json).parent)
        return report
    if not args.runs:
        ap.error("give one or more run directories (or --from-json REPORT)")
    torch.set_num_threads(args.threads)

    from flowalign.rewards import RewardError, build_reward

    proxy = build_reward(args.proxy, **({"path": args.shapeclip} if args.shapeclip and args.proxy == "shapeclip" else {}))
    artifact = None
    if args.artifact != "none":
        try:
            artifact = build_reward("artifact", **({"path": args.artifact} if args.artifact else {}))
        except RewardError as e:
            if args.artifact:
                raise
            print(f"(no learned artifact reward: {e})")
    metas = subsample(benchmark_metadata(args.benchmark), args.n_per_task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, run in [("base", None)] + [(Path(r).name, r) for r in args.runs]:
        adapter = load_adapter(args.model) if run is None else load_run(args.model, run)
        rows[name], _ = measure(adapter, metas, args, proxy, artifact)
        r = rows[name]
        print(f"{name}: judge {r['judge_overall']:.3f}  proxy {r['proxy_mean']:.4g}  "
              f"artifact rate {r['artifact_rate']:.3f}", flush=True)
        del adapter
    report = {"rows": rows, "thresholds": ARTIFACT_THRESHOLDS, "benchmark": args.benchmark,
              "n_per_task": args.n_per_task, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
              "model": args.model, "runs": args.runs, "proxy": args.proxy}
    write_outputs(report, out)
    return report


def write_outputs(report: dict, out: Path) -> None:
    """hacking_report.json / .md / .png from the measured rows (``--from-json`` redraws them without measuring)."""
    rows, proxy = report["rows"], report["proxy"]
    (out / "hacking_report.json").write_text(json.dumps(report, indent=1))
    table = format_table({n: {"per_task": r["judge_per_task"], "overall": r["judge_overall"]} for n, r in rows.items()})
    summary = ["| | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows),
               f"| proxy ({proxy}) mean | " + " | ".join(f"{r['proxy_mean']:.4g}" for r in rows.values()) + " |",
               "| artifact rate | " + " | ".join(f"{r['artifact_rate']:.3f}" for r in rows.values()) + " |"]
    if all("judges_overall" in r for r in rows.values()):
        for j, label in (("heldout_strict", "held-out judge, strict (headline)"), ("heldout", "held-out judge"),
                         ("train_strict", "training judge, strict")):
            summary.append(f"| {label}, overall | " + " | ".join(f"{r['judges_overall'][j]:.3f}" for r in rows.values())
                           + " |")
        summary.append("| agreement training vs held-out judge | "
                       + " | ".join(f"{r['agreement_train_vs_heldout']:.3f}" for r in rows.values()) + " |")
    if all("artifact_reward_mean" in r for r in rows.values()):
        summary.append("| artifact reward mean | "
                       + " | ".join(f"{r['artifact_reward_mean']:.3f}" for r in rows.values()) + " |")
    md = (f"# Reward hacking report\n\nExact judge accuracy ({report['benchmark']}, {report['n_per_task']} prompts "
          f"per task, {report['steps']} steps, CFG {report['guidance']}):\n\n{table}\n\n" + "\n".join(summary)
          + f"\n\nArtifact rate thresholds (detector.artifact_stats): {json.dumps(report['thresholds'])}\n")
    (out / "hacking_report.md").write_text(md)
    plot(rows, out / "hacking_report.png", proxy)
    print(md)


if __name__ == "__main__":
    main()
