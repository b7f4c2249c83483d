"""How far the ShapeWorld judges can be trusted on generated images: each judge's accuracy against the hand-labelled
gold set, and the four judges (training lenient/strict, held-out lenient/strict) with their per-image agreement on
a model's benchmark images at several CFG scales.

usage:
  python benchmarks/judge_agreement.py --gold-only                    # accuracy vs the gold set (seconds)
  python benchmarks/judge_agreement.py --gold-only --v2               # ... and the training judge v1 vs v2
  python benchmarks/judge_agreement.py [--model shapeworld] [--trained RUN/final]
         [--prompts shapeworld:test,shapeworld:test_unseen] [--guidance 1.5,2,3] [--steps 20] [--n-per-task 100]
         [--out runs/judge_agreement]
Prints markdown (the tables of docs/judging.md); with --out also writes results.json and one audit grid per
(prompts, CFG) of the images on which the judges disagree.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowalign.eval.benchmark import TASK_ORDER
from flowalign.eval.judges import (
    AGREEMENT_PAIRS,
    GOLD_DIR,
    format_gold_table,
    gold_accuracy,
    load_gold,
)

V2_ROWS = ("train", "train_v2", "train_strict", "train_v2_strict")  # the training judge, version 1 next to 2
SUBSETS = [("base model images only", lambda r: r["source"].startswith("base")),
           ("trained model images only", lambda r: r["source"].startswith("trained")),
           ("images not marked unsure", lambda r: not r["unsure"])]


def gold_report(directory) -> str:
    recs, images = load_gold(directory)
    out = [f"Gold set: {len(recs)} images ({', '.join(sorted({r['source'] for r in recs}))}), "
           f"{sum(r['gold'] for r in recs)} correct by eye, {sum(r['unsure'] for r in recs)} marked unsure.", "",
           "<!-- gold-accuracy:begin -->", format_gold_table(gold_accuracy(recs, images)),
           "<!-- gold-accuracy:end -->"]
    for name, keep in SUBSETS:
        sub = [k for k, r in enumerate(recs) if keep(r)]
        if sub and len(sub) < len(recs):
            out += ["", f"{name} (n = {len(sub)}):", "",
                    format_gold_table(gold_accuracy([recs[k] for k in sub], images[sub]))]
    return "\n".join(out)


def gold_report_v2(directory) -> str:
    """The training judge's version 1 and version 2 (lenient, strict) against the gold set, all and per subset;
    the first table is the one tests/test_judge_v2.py compares with docs/judging.md."""
    recs, images = load_gold(directory)
    out = ["<!-- gold-accuracy-v2:begin -->", format_gold_table(gold_accuracy(recs, images, v2=True), judges=V2_ROWS),
           "<!-- gold-accuracy-v2:end -->"]
    for name, keep in SUBSETS:
        sub = [k for k, r in enumerate(recs) if keep(r)]
        if sub and len(sub) < len(recs):
            out += ["", f"{name} (n = {len(sub)}):", "",
                    format_gold_table(gold_accuracy([recs[k] for k in sub], images[sub], v2=True), judges=V2_ROWS)]
    return "\n".join(out)


def agreement_table(results: dict[str, dict]) -> str:
    cols = list(results)
    lines = ["| agreement | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for a, b in AGREEMENT_PAIRS:
        k = f"{a}_vs_{b}"
        lines.append(f"| {a} vs {b} | " + " | ".join(f"{results[c]['agreement'][k]['overall']:.3f}" for c in cols) + " |")
    tasks = [t for t in TASK_ORDER if t in next(iter(results.values()))["per_task"]]
    for t in tasks:
        lines.append(f"| train vs heldout, {t} | " + " | ".join(
            f"{results[c]['agreement']['train_vs_heldout']['per_task'][t]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def compact_table(results: dict[str, dict]) -> str:
    """One row per (CFG, judge): accuracy per task and overall with its SE, plus train-vs-held-out agreement."""
    tasks = [t for t in TASK_ORDER if t in next(iter(results.values()))["per_task"]]
    lines = ["| CFG | judge | " + " | ".join(tasks) + " | overall ± SE |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for c, r in results.items():
        for j in ("heldout_strict", "heldout", "train_strict", "train"):
            jr = r["judges"][j]
            lines.append(f"| {c.removeprefix('CFG ')} | {j} | " + " | ".join(f"{jr['per_task'][t]:.2f}" for t in tasks)
                         + f" | **{jr['overall']:.3f}** ± {jr['se_overall']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gold", default=str(GOLD_DIR))
    ap.add_argument("--gold-only", action="store_true")
    ap.add_argument("--no-gold", action="store_true")
    ap.add_argument("--v2", action="store_true", help="also the training judge's version 2 against the gold set")
    ap.add_argument("--model", default="shapeworld")
    ap.add_argument("--trained", default=None)
    ap.add_argument("--prompts", default="shapeworld:test")
    ap.add_argument("--guidance", default="3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--wide", action="store_true", help="also print format_judges_table (every cell with its SE)")
    a = ap.parse_args()
    try:
        guid = [float(g) for g in a.guidance.split(",")]
        if not a.no_gold:
            print("## Accuracy against the gold set\n")
            print(gold_report(a.gold), flush=True)
            if a.v2:
                print("\n## The training judge, version 1 and version 2, against the gold set\n")
                print(gold_report_v2(a.gold), flush=True)
        if a.gold_only:
            return 0
        import torch
        from flowalign.eval.benchmark import (
            evaluate,
            format_judges_table,
            resolve_prompts,
            save_audit_grid,
            subsample,
        )
        from flowalign.eval.geneval import load_metadata
        from flowalign.pipelines.base import load_adapter

        from flowalign.shapeworld import MODEL_DIR

        torch.set_num_threads(max(1, torch.get_num_threads()))
        ad = load_adapter(str(MODEL_DIR) if a.model == "shapeworld" else a.model)
        if a.trained:
            ad.load_trained(a.trained)
        out = Path(a.out) if a.out else None
        dump = {}
        for spec in a.prompts.split(","):
            metas = subsample(load_metadata(resolve_prompts(spec)), a.n_per_task)
            results = {}
            for g in guid:
                res, images = evaluate(ad, metas, a.steps, g, a.seed)
                results[f"CFG {g:g}"] = res
                if out:
                    save_audit_grid(images, metas, res["per_image"], out / f"audit_{spec.replace(':', '_')}_cfg{g:g}.png")
            who = a.model + (f" + {a.trained}" if a.trained else "")
            print(f"\n## {who}: {spec}, n = {a.n_per_task} per task, {a.steps} ODE steps, seed {a.seed}\n")
            print(compact_table(results))
            print()
            print(agreement_table(results), flush=True)
            if a.wide:
                print()
                print(format_judges_table(results), flush=True)
            dump[spec] = {c: {k: r[k] for k in ("judges", "agreement", "per_task", "overall")} for c, r in results.items()}
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(dump, indent=1))
            print(f"\nwrote {out}/results.json and the audit grids")
    except (FileNotFoundError, ValueError) as e:
        print(f"judge_agreement: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
