"""Inference-time alignment on ShapeWorld at equal NFE: base sampling, best-of-N (shapeclip verifier), ReNO
(shapeclip; shapeclip + artifact), CARINOX (rewards chosen per task by rank correlation with the exact judge on
training prompts), FK steering (the exact judge as potential; shapeclip as potential) and best-of-N with the exact
training judge as verifier (a ceiling), all from the same seeds, judged by every ShapeWorld judge (headline: the
held-out judge's strict verdict).

    python benchmarks/noise_opt.py --n-per-task 100 --budget 288 --out runs/noise_opt
    python benchmarks/noise_opt.py --memory-probe      # ReNO's peak memory with and without checkpointing

Every method runs in its own process (one after another, ``--threads`` each), so that its peak memory (peak RSS of
that process, model and judges included) is its own. Record i of the test file starts from the noise of
``Generator(seed + i)`` (seed 1000: the evaluation's), so "base" is exactly ``flowalign eval``'s sample. Writes
``report.md`` (tables), ``results.json`` (everything, per-image verdicts included), ``calibration.json``
(CARINOX's reward choice) and ``grid_<method>.png`` (first images of each task, border = headline verdict).
``--split train --seed 7000`` runs the same on training prompts with other seeds (for choosing settings without
looking at the test prompts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT = ("base", "bon_shapeclip", "reno_shapeclip", "reno_shapeclip_artifact", "carinox", "fk_judge",
           "fk_shapeclip", "bon_judge")
TUNED = ("fk_judge_tuned", "fk_shapeclip_tuned")  # FK with the settings chosen on training prompts (--fk-tuned)
# shapevalue (rewards/shapevalue.py): the learned value model distilled from the training judge v2, as best-of-N's
# verifier, FK's potential (first settings, and tuned on training prompts: --fk-tuned's "shapevalue" entry) and
# ReNO's reward
VALUE = ("bon_shapevalue", "fk_shapevalue", "fk_shapevalue_tuned", "reno_shapevalue")
# FK with shapevalue as the potential and the final pick by shapeclip / the exact judge, the settings chosen on
# training prompts (benchmarks/fk_screen.py --configs hybrid, then --select: chosen.json's "hybrid" and
# "hybrid_judge" entries; --fk-tuned)
HYBRID = ("fk_hybrid_tuned", "fk_hybrid_judge_tuned")
ALL = DEFAULT[:7] + TUNED + DEFAULT[7:] + VALUE + HYBRID
LABELS = {
    "base": "base sampling (ODE)",
    "bon_shapeclip": "best-of-N, shapeclip verifier",
    "reno_shapeclip": "ReNO, shapeclip",
    "reno_shapeclip_artifact": "ReNO, shapeclip + artifact",
    "carinox": "CARINOX (rewards per task by correlation)",
    "fk_judge": "FK steering, exact judge potential",
    "fk_shapeclip": "FK steering, shapeclip potential",
    "bon_judge": "best-of-N, exact training judge (ceiling)",
    "fk_judge_tuned": "FK steering, exact judge potential, tuned on training prompts",
    "fk_shapeclip_tuned": "FK steering, shapeclip potential, tuned on training prompts",
    "bon_shapevalue": "best-of-N, shapevalue verifier",
    "fk_shapevalue": "FK steering, shapevalue potential",
    "fk_shapevalue_tuned": "FK steering, shapevalue potential, tuned on training prompts",
    "reno_shapevalue": "ReNO, shapevalue",
    "fk_hybrid_tuned": "FK steering, shapevalue potential, final pick by shapeclip, tuned on training prompts",
    "fk_hybrid_judge_tuned": "FK steering, shapevalue potential, final pick by the exact judge, tuned on training "
                             "prompts",
}
CANDIDATES = {"shapeclip": "shapeclip", "artifact": "artifact"}  # + "shapeclip+artifact" (built from args)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-per-task", type=int, default=100)
    ap.add_argument("--budget", type=int, default=288, help="NFE per prompt of every method but base")
    ap.add_argument("--methods", default=",".join(DEFAULT), help=f"comma-separated, of {', '.join(ALL)} (the "
                    "*_tuned ones need --fk-tuned)")
    ap.add_argument("--fk-tuned", default=None, help="chosen.json of benchmarks/fk_screen.py --select: the FK "
                    "options per potential (shapeclip, judge) for the *_tuned entries")
    ap.add_argument("--split", default="test", choices=("test", "train"))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=100, help="prompts per optimize() call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reno-sampler-steps", type=int, default=4)
    ap.add_argument("--reno-lr", type=float, default=5.0)
    ap.add_argument("--reno-checkpointing", action="store_true",
                    help="gradient checkpointing in ReNO/CARINOX (counts its recomputation: fewer iterations)")
    ap.add_argument("--artifact-weight", type=float, default=1.0)
    ap.add_argument("--carinox-explore", type=int, default=8)
    ap.add_argument("--carinox-top-k", type=int, default=1)
    ap.add_argument("--fk-lam-judge", type=float, default=10.0)
    ap.add_argument("--fk-lam-shapeclip", type=float, default=1.0)
    ap.add_argument("--fk-lam-shapevalue", type=float, default=10.0,
                    help="shapevalue is a probability in [0, 1], like the judge's partial credit")
    ap.add_argument("--shapevalue-path", default=None, help="shapevalue weights (default the shipped ones)")
    ap.add_argument("--fk-noise", type=float, default=0.7)
    ap.add_argument("--fk-potential", default="max")
    ap.add_argument("--calib-per-task", type=int, default=40, help="CARINOX calibration images per task")
    ap.add_argument("--calib-seed", type=int, default=5000)
    ap.add_argument("--model", default="shapeworld", help="pipeline dir (default the shipped ShapeWorld model)")
    ap.add_argument("--out", default="runs/noise_opt")
    ap.add_argument("--memory-probe", action="store_true",
                    help="only: ReNO on the first 100 prompts, 2 iterations, gradient checkpointing off and on "
                         "(each in its own process): peak memory and NFE")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def metadata(a):
    from flowalign.eval.benchmark import resolve_prompts, subsample
    from flowalign.eval.geneval import load_metadata

    return subsample(load_metadata(resolve_prompts(f"shapeworld:{a.split}")), a.n_per_task)


def spec(name, a):
    """(noise method, reward spec, options) of a benchmark entry."""
    reno = dict(sampler_steps=a.reno_sampler_steps, lr=a.reno_lr, checkpointing=a.reno_checkpointing)
    sa = {"shapeclip": 1.0, "artifact": a.artifact_weight}
    # the FK settings of the first run (seed 1000), every option explicit so that a change of noise.py's defaults
    # cannot change them
    fk = dict(noise_level=a.fk_noise, potential=a.fk_potential, resample_at=[4, 8, 12], sde_until=a.steps - 2,
              ess_threshold=1.0, resampling="multinomial", sde_from=0)
    tuned = json.loads(Path(a.fk_tuned).read_text()) if a.fk_tuned else {}
    sv = {"shapevalue": {"weight": 1.0, "path": a.shapevalue_path}} if a.shapevalue_path else "shapevalue"
    # shapevalue's FK rows start from the current default (ODE until the first resampling step)
    fk_new = dict(fk, sde_from=4)
    return {
        "base": ("best_of_n", "shapeclip", dict(n=1)),
        "bon_shapeclip": ("best_of_n", "shapeclip", {}),
        "reno_shapeclip": ("reno", "shapeclip", reno),
        "reno_shapeclip_artifact": ("reno", sa, reno),
        "carinox": ("carinox", "shapeclip", dict(reno, n_explore=a.carinox_explore, top_k=a.carinox_top_k)),
        "fk_judge": ("fk", {"shapeworld": 1.0}, dict(fk, lam=a.fk_lam_judge)),
        "fk_shapeclip": ("fk", "shapeclip", dict(fk, lam=a.fk_lam_shapeclip)),
        "bon_judge": ("best_of_n", {"shapeworld": 1.0}, {}),
        "fk_judge_tuned": ("fk", {"shapeworld": 1.0}, tuned.get("judge", {}).get("options")),
        "fk_shapeclip_tuned": ("fk", "shapeclip", tuned.get("shapeclip", {}).get("options")),
        "bon_shapevalue": ("best_of_n", sv, {}),
        "fk_shapevalue": ("fk", sv, dict(fk_new, lam=a.fk_lam_shapevalue)),
        "fk_shapevalue_tuned": ("fk", sv, tuned.get("shapevalue", {}).get("options")),
        "reno_shapevalue": ("reno", sv, reno),
        "fk_hybrid_tuned": ("fk", "shapeclip", tuned.get("hybrid", {}).get("options")),
        "fk_hybrid_judge_tuned": ("fk", {"shapeworld": 1.0}, tuned.get("hybrid_judge", {}).get("options")),
    }[name]


def calibrate(a, adapter, out: Path) -> dict:
    """CARINOX's reward selection: base samples of training prompts (their own seeds), each candidate's rank
    correlation with the exact judge's partial credit per task; the best candidate per task."""
    from flowalign import noise
    from flowalign.eval.benchmark import resolve_prompts
    from flowalign.eval.geneval import load_metadata

    path = out / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())
    by: dict[str, list[dict]] = {}
    for m in load_metadata(resolve_prompts("shapeworld:train")):
        by.setdefault(m["tag"], []).append(m)
    # calib_per_task images per task: a task with fewer distinct prompts repeats them (each image its own noise)
    cal = [ms[i % len(ms)] for ms in by.values() for i in range(a.calib_per_task)]
    t0 = time.perf_counter()
    _, images = noise.base_samples(adapter, [m["prompt"] for m in cal], a.calib_seed, None, a.guidance, a.steps)
    cands = dict(CANDIDATES, **{"shapeclip+artifact": {"shapeclip": 1.0, "artifact": a.artifact_weight}})
    sel = noise.select_rewards(images, cal, cands, noise.shapeworld_judge)
    rec = {"category_rewards": sel.category_rewards(), "chosen": sel.chosen, "correlations": sel.correlations,
           "n": sel.n, "table": sel.table(), "seconds": time.perf_counter() - t0, "seed": a.calib_seed,
           "judge": "training judge (exact detector) partial credit", "prompts": "shapeworld:train"}
    path.write_text(json.dumps(rec, indent=1))
    return rec


def child(a) -> None:
    """One method over every prompt, judged; writes OUT/<name>.json."""
    import torch

    torch.set_num_threads(a.threads)
    from flowalign import noise
    from flowalign.eval.judges import judge_all
    from flowalign.pipelines.base import load_adapter
    from flowalign.rewards import to_uint8
    from flowalign.trainer import resolve_model_path

    name, out = a.child, Path(a.out)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    adapter = load_adapter(resolve_model_path(a.model))
    meta = metadata(a)
    method, rspec, opts = spec(name, a)
    budget = None if name == "base" else a.budget
    extra = {}
    if name == "carinox":
        cal = calibrate(a, adapter, out)
        opts = dict(opts, category_rewards=cal["category_rewards"])
        extra["calibration"] = {k: cal[k] for k in ("chosen", "correlations", "n", "seconds")}
    reward = noise.resolve_reward(rspec)
    cat = {c: noise.resolve_reward(r) for c, r in opts.pop("category_rewards", {}).items()}
    if cat:
        opts["category_rewards"] = cat
    images, infos, nfe, secs, peak, delta = [], [], 0, 0.0, 0.0, 0.0
    for s in range(0, len(meta), a.chunk):
        m = meta[s:s + a.chunk]
        res = noise.optimize(adapter, [r["prompt"] for r in m], reward, method, budget, a.seed, metadata=m,
                             guidance=a.guidance, num_steps=a.steps, indices=range(s, s + len(m)), **opts)
        images.append(to_uint8(res.images))
        info = {k: v for k, v in res.info.items() if k not in ("ess", "resampled", "final_particle_rewards",
                                                                "best_preview_reward", "explored_best",
                                                                "seeds_kept", "picked")}
        info["trajectory_mean"] = [float(x) for x in torch.nanmean(res.trajectory, 1)]
        if "ess" in res.info:
            info["resampled_fraction"] = [float(np.mean(r)) for r in res.info["resampled"]]
            info["mean_ess"] = [float(np.mean(e)) for e in res.info["ess"]]
            info["ancestors_per_prompt"] = res.info["final_ancestors"]
            info["mean_ancestors"] = [float(np.mean(x)) for x in res.info["ancestors"]]
            info["mean_final_ancestors"] = float(np.mean(res.info["final_ancestors"]))
        infos.append(info)
        nfe += res.nfe
        secs += res.seconds
        peak = max(peak, res.peak_memory_mb)
        delta = max(delta, res.peak_memory_mb - res.info["memory_at_start_mb"])
        print(f"{name}: {s + len(m)}/{len(meta)} prompts, {secs:.0f} s", file=sys.stderr, flush=True)
    images = np.concatenate(images)
    j = judge_all(meta, images)
    np.save(out / f"images_{name}.npy", images)
    rec = {"name": name, "label": LABELS[name], "method": method, "reward": str(rspec),
           "options": {k: (str(v) if k == "category_rewards" else v) for k, v in opts.items()},
           "nfe_per_prompt": nfe / len(meta), "seconds_per_prompt": secs / len(meta), "seconds": secs,
           "peak_memory_mb": peak, "memory_delta_mb": delta, "n_prompts": len(meta),
           "info": infos[0] if len(infos) == 1 else infos,
           "judges": j["judges"], "agreement": {k: v["overall"] for k, v in j["agreement"].items()},
           "verdicts": [r["verdicts"] for r in j["per_image"]], "tags": [r["tag"] for r in j["per_image"]], **extra}
    (out / f"{name}.json").write_text(json.dumps(rec, default=float))


def paired(tags, a, b) -> tuple[dict, float, float]:
    """Per task mean of a - b and the overall (mean of tasks) with the paired SE."""
    by: dict[str, list[float]] = {}
    for t, x, y in zip(tags, a, b):
        by.setdefault(t, []).append(float(x) - float(y))
    d = {t: float(np.mean(v)) for t, v in by.items()}
    se = [np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan") for v in by.values()]
    return d, float(np.mean(list(d.values()))), math.sqrt(sum(s * s for s in se)) / len(se)


def report(a, recs: dict) -> str:
    from flowalign.eval.benchmark import TASK_ORDER

    H = "heldout_strict"
    base = recs.get("base")
    n = next(iter(recs.values()))["n_prompts"]
    lines = [f"ShapeWorld {a.split} prompts ({a.n_per_task} per task, {n} in all), seed {a.seed}, CFG {a.guidance}, "
             f"{a.steps} ODE steps, budget {a.budget} NFE per prompt (base: {2 * a.steps}); CPU, {a.threads} "
             f"threads.",
             "", "| method | NFE/prompt | held-out strict (headline) | Δ vs base (paired SE) | held-out "
             "| train strict | train | s/prompt | peak RSS MB (+ over the call's start) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in recs.items():
        J = r["judges"]
        if base is not None and name != "base":
            hv = [v[H] for v in r["verdicts"]]
            bv = [v[H] for v in base["verdicts"]]
            _, dm, dse = paired(r["tags"], hv, bv)
            delta = f"{dm:+.3f} ± {dse:.3f}"
        else:
            delta = "–"
        lines.append(f"| {r['label']} | {r['nfe_per_prompt']:.0f} | **{J[H]['overall']:.3f} ± "
                     f"{J[H]['se_overall']:.3f}** | {delta} | {J['heldout']['overall']:.3f} | "
                     f"{J['train_strict']['overall']:.3f} | {J['train']['overall']:.3f} | "
                     f"{r['seconds_per_prompt']:.3f} | {r['peak_memory_mb']:.0f} (+{r['memory_delta_mb']:.0f}) |")
    lines += ["", "Held-out strict verdict per task (± binomial SE):", "",
              "| method | " + " | ".join(TASK_ORDER) + " |", "|---|" + "---|" * len(TASK_ORDER)]
    for name, r in recs.items():
        J = r["judges"][H]
        lines.append(f"| {name} | " + " | ".join(f"{J['per_task'].get(t, float('nan')):.2f} ± "
                                                  f"{J['se_per_task'].get(t, float('nan')):.2f}"
                                                  for t in TASK_ORDER) + " |")
    lines += ["", "Training judge (lenient; what `shapeworld` pays) per task:", "",
              "| method | " + " | ".join(TASK_ORDER) + " |", "|---|" + "---|" * len(TASK_ORDER)]
    for name, r in recs.items():
        J = r["judges"]["train"]
        lines.append(f"| {name} | " + " | ".join(f"{J['per_task'].get(t, float('nan')):.2f}" for t in TASK_ORDER)
                     + " |")
    pairs = [("fk_shapeclip", "bon_shapeclip"), ("fk_judge", "bon_judge"), ("fk_shapeclip_tuned", "bon_shapeclip"),
             ("fk_judge_tuned", "bon_judge"), ("fk_shapeclip_tuned", "fk_shapeclip"), ("fk_judge_tuned", "fk_judge"),
             ("fk_shapevalue", "bon_shapevalue"), ("fk_hybrid_tuned", "bon_shapeclip"),
             ("fk_hybrid_judge_tuned", "bon_judge"), ("fk_shapevalue_tuned", "bon_shapevalue"),
             ("bon_shapevalue", "bon_shapeclip"), ("reno_shapevalue", "base"), ("reno_shapevalue", "reno_shapeclip"),
             ("carinox", "bon_shapeclip"),
             ("carinox", "reno_shapeclip"), ("reno_shapeclip", "bon_shapeclip"),
             ("reno_shapeclip_artifact", "reno_shapeclip")]
    pairs = [(x, y) for x, y in pairs if x in recs and y in recs]
    if pairs:
        lines += ["", "Paired differences on the same prompts and seeds (held-out strict; training judge beside):", "",
                  "| A − B | held-out strict | train |", "|---|---|---|"]
        for x, y in pairs:
            cell = []
            for jn in (H, "train"):
                _, dm, dse = paired(recs[x]["tags"], [v[jn] for v in recs[x]["verdicts"]],
                                    [v[jn] for v in recs[y]["verdicts"]])
                cell.append(f"{dm:+.3f} ± {dse:.3f}")
            lines.append(f"| {x} − {y} | {cell[0]} | {cell[1]} |")
    if "carinox" in recs and "calibration" in recs["carinox"]:
        c = recs["carinox"]["calibration"]
        lines += ["", f"CARINOX reward per task (Spearman with the training judge's partial credit on "
                      f"{sum(c['n'].values())} base samples of training prompts):", ""]
        names = sorted({k for v in c["correlations"].values() for k in v})
        lines += ["| task | n | " + " | ".join(names) + " | chosen |", "|---|---|" + "---|" * (len(names) + 1)]
        for t in TASK_ORDER:
            if t in c["correlations"]:
                cr = c["correlations"][t]
                cells = " | ".join("–" if cr[k] is None or not math.isfinite(cr[k]) else f"{cr[k]:+.2f}"
                                   for k in names)
                lines.append(f"| {t} | {c['n'][t]} | {cells} | {c['chosen'][t]} |")
    lines += ["", "Settings per method:", ""]
    for name, r in recs.items():
        info = r["info"] if isinstance(r["info"], dict) else r["info"][0]
        keep = {k: info[k] for k in ("n", "iterations", "sampler_steps", "lr", "checkpointing", "n_explore", "top_k",
                                     "particles", "resample_at", "potential", "lam", "noise_level", "sde_from", "sde_until",
                                     "resampling", "ess_threshold") if k in info}
        extra = ""
        if "mean_ess" in info:
            extra = f"; mean ESS at the resampling steps {[round(e, 2) for e in info['mean_ess']]}"
        if "mean_ancestors" in info:
            infos = r["info"] if isinstance(r["info"], list) else [r["info"]]
            fa = [x for q in infos for x in q["ancestors_per_prompt"]]
            extra += (f"; distinct ancestors (initial noises) among the {info['particles']} particles after each "
                      f"resampling step {[round(e, 2) for e in info['mean_ancestors']]}, at the end "
                      f"{np.mean(fa):.2f} (1 ancestor: {np.mean(np.array(fa) == 1):.0%} of prompts)")
        lines.append(f"- {name}: `{r['method']}` reward `{r['reward']}` {json.dumps(keep)}{extra}")
    return "\n".join(lines)


def grids(a, recs, out: Path) -> None:
    from flowalign.eval.benchmark import save_grid

    meta = metadata(a)
    for name, r in recs.items():
        f = out / f"images_{name}.npy"
        if f.is_file():
            imgs = np.load(f)
            m = [dict(x, correct=v["heldout_strict"]) for x, v in zip(meta, r["verdicts"])]
            save_grid(imgs, m, out / f"grid_{name}.png")


def memory_probe(a, checkpointing: bool) -> str:
    import torch

    torch.set_num_threads(a.threads)
    from diffusers.utils import logging as dlog

    from flowalign import noise
    from flowalign.pipelines.base import load_adapter
    from flowalign.trainer import resolve_model_path

    dlog.disable_progress_bar()
    meta = metadata(a)[:100]
    adapter = load_adapter(resolve_model_path(a.model))
    r = noise.optimize(adapter, [m["prompt"] for m in meta], "shapeclip", "reno", iterations=2, seed=a.seed,
                       guidance=a.guidance, num_steps=a.steps, sampler_steps=a.reno_sampler_steps,
                       checkpointing=checkpointing)
    return (f"checkpointing={checkpointing}: {len(meta)} prompts, 2 iterations, {a.reno_sampler_steps} sampler "
            f"steps: peak RSS {r.peak_memory_mb:.0f} MB, +{r.peak_memory_mb - r.info['memory_at_start_mb']:.0f} MB "
            f"over the call's start, NFE/prompt {r.nfe_per_prompt:.0f}, {r.seconds:.1f} s")


def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.child:
        if a.child.startswith("memory:"):
            print(memory_probe(a, a.child == "memory:1"), flush=True)
            return 0
        child(a)
        return 0
    if a.memory_probe:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
        args = list(argv if argv is not None else sys.argv[1:])
        for c in ("0", "1"):
            subprocess.run([sys.executable, __file__, *args, "--child", f"memory:{c}"], env=env, check=True)
        return 0
    names = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL]
    if bad:
        print(f"noise_opt: unknown method(s) {bad}; known: {', '.join(ALL)}", file=sys.stderr)
        return 2
    if any(m in TUNED + HYBRID + ("fk_shapevalue_tuned",) for m in names) and not a.fk_tuned:
        print(f"noise_opt: {', '.join(m for m in names if m.endswith('_tuned'))} need --fk-tuned FILE", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    args = [x for x in (argv if argv is not None else sys.argv[1:])]
    t0 = time.perf_counter()
    for name in names:
        if (out / f"{name}.json").is_file():
            print(f"{name}: done before (delete {out / (name + '.json')} to rerun)", flush=True)
            continue
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, *args, "--child", name], env=env)
        if r.returncode:
            print(f"noise_opt: {name} failed (exit {r.returncode})", file=sys.stderr)
            return r.returncode
        print(f"{name}: {time.perf_counter() - t:.0f} s (total {time.perf_counter() - t0:.0f} s)", flush=True)
    # the report covers every entry of OUT (a later --methods run adds to it)
    recs = {n: json.loads((out / f"{n}.json").read_text()) for n in ALL if (out / f"{n}.json").is_file()}
    md = report(a, recs)
    (out / "report.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": recs}, default=float))
    grids(a, recs, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
