"""What does perfect supervision buy this model in the same CPU minutes?

Continues the shipped ShapeWorld base's own pre-training (rectified flow on ground-truth renders of the training
prompts, the recipe's lr and EMA, a new data seed) and judges it on the held-out prompts every ``--chunk`` steps with
the main job's evaluation protocol (20 ODE steps, CFG 3, n per task). It is an upper reference for an RL run of the
same wall-clock budget: RL sees only a scalar reward of its own samples, this sees the answer. Prints one line per
chunk and writes them to ``--out`` (JSON lines). The shipped base is not modified (the weights live in memory).

With ``--save DIR`` each chunk's whole pipeline (transformer and text encoders: the recipe trains both) is saved as
``DIR/steps_N``, a model folder that ``flowalign eval --model NAME=DIR/steps_N`` judges with the headline protocol
(held-out strict verdict, the CFG grid, any noise seed).

usage: python benchmarks/supervised_reference.py [--chunk 2000] [--chunks 4] [--n-per-task 100] [--out FILE]
       [--save DIR]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=2000, help="pre-training steps between evaluations")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/supervised_reference.jsonl")
    ap.add_argument("--save", default=None, help="save each chunk's pipeline as DIR/steps_N")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from pathlib import Path

    from flowalign.eval.benchmark import evaluate, resolve_prompts, subsample
    from flowalign.eval.geneval import load_metadata
    from flowalign.pipelines.base import load_adapter
    from flowalign.shapeworld import MODEL_DIR
    from flowalign.shapeworld.pretrain import Recipe, train_flow

    ad = load_adapter(str(MODEL_DIR), "sd3")
    test = subsample(load_metadata(resolve_prompts("shapeworld:test")), a.n_per_task)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    base, _ = evaluate(ad, test, a.steps, a.guidance, 1000, 200)
    rows.append({"steps": 0, "minutes": 0.0, "overall": base["overall"], "per_task": base["per_task"]})
    print(f"base: overall {base['overall']:.3f}", flush=True)
    for c in range(a.chunks):
        train_flow(Recipe(seed=100 + c, steps=a.chunk), ad.pipe, lambda rec: None)
        if a.save:
            ad.pipe.save_pretrained(str(Path(a.save) / f"steps_{a.chunk * (c + 1)}"))
        res, _ = evaluate(ad, test, a.steps, a.guidance, 1000, 200)
        rows.append({"steps": a.chunk * (c + 1), "minutes": round((time.time() - t0) / 60, 2),
                     "overall": res["overall"], "per_task": res["per_task"]})
        print(f"{rows[-1]['steps']} supervised steps ({rows[-1]['minutes']:.1f} min): overall {res['overall']:.3f}  "
              + " ".join(f"{k}={v:.2f}" for k, v in res["per_task"].items()), flush=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
