"""``flowalign eval``: its arguments and its driver (``flowalign/cli.py`` calls these two functions)."""
from __future__ import annotations

import shlex
import sys


def add_eval_args(e) -> None:
    e.add_argument("--model", action="append", default=None, metavar="[NAME=]MODEL[+TRAINED][@METHOD[:k=v,...]]",
                   help="repeatable; 'shapeworld' (the shipped base), a pipeline dir or hub id, a run's final/ or run "
                        "dir or checkpoints/iter_N (applied on --base), BASE+TRAINED, and @best_of_n:n=4,"
                        "reward=shapeclip for an inference-time method (docs/eval.md). The first is the reference")
    e.add_argument("--base", default="shapeworld", help="pipeline under trained weights given alone")
    e.add_argument("--benchmark", action="append", default=None,
                   help="repeatable: shapeworld-geneval | shapeworld-geneval-unseen | shapeworld-compbench | a GenEval "
                        "metadata .jsonl | a T2I-CompBench directory of *_val.txt files (or one file)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--trained", "--lora", dest="lora", default=None,
                   help="with one --model: a run's final/ directory to apply on top (LoRA weights or transformer/), "
                        "or a full fine-tuning checkpoint (runs/X/checkpoints/iter_N)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, nargs="+", default=[2.0],
                   help="CFG scale(s); with several each model is headlined at its best (protocol: 1.5 2 3)")
    e.add_argument("--compbench-guidance", type=float, nargs="+", default=None,
                   help="the CFG grid of T2I-CompBench-style benchmarks (default: --guidance)")
    e.add_argument("--seed", type=int, default=1000, help="record i starts from the noise of seed + i")
    e.add_argument("--n-per-task", type=int, default=None, help="at most N records per task / category")
    e.add_argument("--images-per-prompt", type=int, default=4, help="T2I-CompBench: images (seeds) per prompt")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--reward", action="append", default=None, metavar="NAME",
                   help="repeatable: a registry reward reported as an extra column")
    e.add_argument("--diversity", default="shapeclip", help="shapeclip | clip=PATH_OR_HUB_ID | none")
    e.add_argument("--cache", default="runs/eval_cache", help="image and score cache (reused across runs)")
    e.add_argument("--geneval-detector", default=None, help="OWLv2 dir or hub id to judge non-ShapeWorld GenEval files")
    e.add_argument("--compbench-blip", default=None, help="BLIP-VQA dir or hub id (attribute binding, real images)")
    e.add_argument("--compbench-owl", default=None, help="OWLv2 dir or hub id (spatial, real images)")
    e.add_argument("--compbench-clip", default=None, help="CLIP dir or hub id (non-spatial, real images)")
    e.add_argument("--grid-per-task", type=int, default=6, help="sample-grid columns per task")
    e.add_argument("--no-progress", action="store_true")


def run_eval(a) -> int:
    """Several models x one or more benchmarks -> one report (``eval.suite``); a single model on a GenEval-style
    benchmark also writes the old eval.json, samples.png and audit.png."""
    from . import suite as S

    if a.images_per_prompt < 1:
        raise S.EvalError(f"--images-per-prompt must be >= 1, got {a.images_per_prompt}")
    if a.steps < 1:
        raise S.EvalError(f"--steps must be >= 1, got {a.steps}")
    if any(g < 1 for g in a.guidance):
        raise S.EvalError(f"--guidance: CFG scales must be >= 1, got {a.guidance}")
    specs = a.model or ["shapeworld"]
    if a.lora:
        if len(specs) != 1:
            raise S.EvalError("--trained applies to one --model; with several, write MODEL+TRAINED per --model")
        specs = [f"{specs[0]}+{a.lora}"]
    models = [S.parse_model(m, a.base) for m in specs]
    suites = [S.parse_benchmark(b, a.n_per_task, a.images_per_prompt, real_geneval=bool(a.geneval_detector),
                                real_compbench=bool(a.compbench_blip or a.compbench_owl or a.compbench_clip))
              for b in (a.benchmark or ["shapeworld-geneval"])]
    if a.compbench_guidance and any(g < 1 for g in a.compbench_guidance):
        raise S.EvalError(f"--compbench-guidance: CFG scales must be >= 1, got {a.compbench_guidance}")
    for s in suites:
        if s.kind == "compbench" and a.compbench_guidance:
            s.guidance = tuple(a.compbench_guidance)
    diversity = None if a.diversity == "none" else a.diversity
    if diversity == "shapeclip" and any(s.scorer != "shapeworld" for s in suites):
        diversity = None  # shapeclip only knows ShapeWorld; give --diversity clip=PATH for real images
    opt = S.Options(steps=a.steps, guidance=tuple(a.guidance), seed=a.seed, batch_size=a.batch_size, cache=a.cache,
                    rewards=tuple(a.reward or ()), diversity=diversity, geneval_detector=a.geneval_detector,
                    compbench_blip=a.compbench_blip, compbench_owl=a.compbench_owl, compbench_clip=a.compbench_clip,
                    progress=not a.no_progress, grid_per_task=a.grid_per_task)
    runner = S.Runner(models, suites, opt)
    runner.run()
    cmd = "flowalign eval " + " ".join(shlex.quote(x) for x in sys.argv[2:]) if len(sys.argv) > 2 else None
    out = S.write_report(runner, a.out, cmd)
    names = [m.name for m in models]
    for suite in suites:
        res = runner.results["suites"][suite.name]
        print(f"## {suite.name}")
        print(S.side_by_side(res, names, res["headline"], suite.tasks))
        print()
    if len(models) == 1 and len(suites) == 1 and suites[0].kind == "geneval":
        _legacy(runner, models[0], suites[0], a)
    print(f"wrote {out['report']}, {out['results']} and {len(out['pngs'])} PNGs; images cached under {a.cache}")
    return 0


def _legacy(runner, model, suite, a) -> None:
    """eval.json, samples.png and audit.png of one model (the training judge's lenient verdict on top, all judges)."""
    import json
    from pathlib import Path

    from .benchmark import format_judges_table, format_table, save_audit_grid, save_grid
    from .geneval import summarize

    images, per = runner.images[(suite.name, model.name)]
    sw = suite.scorer == "shapeworld"
    j = "train" if sw else "real"
    per_image = [{"tag": r["tag"], "prompt": r["prompt"], "correct": bool(p["verdicts"][j]),
                  "partial": p.get("partial"), **({"verdicts": p["verdicts"]} if sw else {})}
                 for r, p in zip(suite.records, per)]
    res = summarize(per_image)
    S = runner.results["suites"][suite.name]["models"][model.name]
    if sw:
        res.update(judges=S["judges"], agreement=S.get("agreement"))
    res.update(num_steps=a.steps, guidance=S["best_guidance"], seed=a.seed, model=model.base, lora=model.trained,
               benchmark=suite.name)
    out = Path(a.out)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    print(format_table({suite.name: res}))
    if sw:
        print()
        print(format_judges_table({suite.name: res}))
        save_audit_grid(images, suite.records, per_image, out / "audit.png")
    save_grid(images, [dict(r, correct=p["correct"]) for r, p in zip(suite.records, per_image)], out / "samples.png")
