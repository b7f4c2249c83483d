"""Does a trained model's gain carry over from the training sampler to the evaluation protocol?

Scores the base model and each run's ``final/`` weights on the held-out ShapeWorld test prompts (n per task, fixed
per-record noises) under several deterministic protocols (ODE steps x CFG) and under the training sampler itself
(flow SDE, noise level, CFG and step count of the run's config, one fixed generator), and prints one table.

usage: python benchmarks/protocol_transfer.py runs/shapeworld_flow_grpo [more runs] [--protocols 20x3 10x2 ...]
Writes ``protocol_transfer.json`` next to the first run unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowalign.eval.benchmark import benchmark_metadata, evaluate, subsample
from flowalign.eval.geneval import score_images
from flowalign.pipelines.base import load_adapter
from flowalign.rewards.base import to_uint8
from flowalign.rollout import rollout, sde_mask, trained_steps
from flowalign.shapeworld import MODEL_DIR


def sde_score(adapter, metas, cfg: dict, seed: int, batch_size: int) -> float:
    """Overall judge accuracy of images drawn with a run's training sampler (its config.json): the SDE on the
    configured steps, or, with branching, on one step per image drawn from the trained ones."""
    s = cfg["sample"]
    g = torch.Generator().manual_seed(seed)
    sig = adapter.schedule(s["num_steps"])
    mask = sde_mask(s["num_steps"], s["sde_steps"])
    if s.get("branching"):
        pool = torch.tensor(trained_steps(mask, cfg.get("algorithm", {}).get("train_steps", "sde")))
        at = pool[torch.randint(len(pool), (len(metas),), generator=g)]
        mask = torch.nn.functional.one_hot(at, s["num_steps"]).bool()
    images = []
    for k in range(0, len(metas), batch_size):
        mb = metas[k:k + batch_size]
        cond = adapter.encode([m["prompt"] for m in mb], negative="" if s["guidance"] > 1 else None)
        tr = rollout(adapter, cond, sig, s["guidance"], s["noise_level"], mask if mask.ndim == 1 else
                     mask[k:k + batch_size], generator=g, kernel=s["kernel"],
                     noise_block=s.get("noise_block", 1))
        images += list(to_uint8(tr.images))
    return score_images(metas, images)["overall"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--protocols", nargs="+", default=["20x3", "20x2", "10x3", "10x2"],
                    help="STEPSxCFG pairs for the ODE protocols")
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    metas = subsample(benchmark_metadata("shapeworld-geneval"), a.n_per_task)
    run_cfg = json.loads((Path(a.runs[0]) / "config.json").read_text())
    rows = {}
    for name, run in [("base", None)] + [(Path(r).name, r) for r in a.runs]:
        ad = load_adapter(a.model)
        if run is not None:
            ad.load_trained(Path(run) / "final")
        row = {}
        for p in a.protocols:
            steps, cfg = p.split("x")
            row[f"ODE {steps} steps, CFG {cfg}"] = evaluate(ad, metas, int(steps), float(cfg), a.seed,
                                                             a.batch_size)[0]["overall"]
        row["training sampler (SDE)"] = sde_score(ad, metas, run_cfg, a.seed, a.batch_size)
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    cols = list(next(iter(rows.values())))
    lines = ["| protocol | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {c} | " + " | ".join(f"{rows[n][c]:.3f}" for n in rows) + " |" for c in cols]
    print("\n".join(lines))
    out = Path(a.out) if a.out else Path(a.runs[0]) / "protocol_transfer.json"
    out.write_text(json.dumps({"rows": rows, "n_per_task": a.n_per_task, "seed": a.seed,
                               "training_sampler": run_cfg["sample"]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
