"""Choose the evaluation protocol for a model: the held-out ShapeWorld judge score for several CFG scales and step
counts (same prompts, same per-record noise). The trained model is then compared with the base at the base's best
setting. usage: python benchmarks/base_protocol.py [--model DIR] [--guidance 1.5,2,3,4.5] [--steps 20,40]"""
from __future__ import annotations

import argparse
import json

import torch

from flowalign.eval.benchmark import benchmark_metadata, evaluate, subsample
from flowalign.pipelines.base import load_adapter
from flowalign.shapeworld import MODEL_DIR


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--guidance", default="1.5,2,3,4.5")
    ap.add_argument("--steps", default="20,40")
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the results as JSON lines here")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ad = load_adapter(a.model)
    metas = subsample(benchmark_metadata("shapeworld-geneval"), a.n_per_task)
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for g in [float(x) for x in a.guidance.split(",")]:
            res, _ = evaluate(ad, metas, steps, g)
            row = {"steps": steps, "guidance": g, "overall": round(res["overall"], 3),
                   **{k: round(v, 3) for k, v in res["per_task"].items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["overall"])
    print("best:", json.dumps(best))
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
