"""Screen FK-steering settings against best-of-N at equal NFE on ShapeWorld **training** prompts (never the test
prompts), judged only by the potential's own reward and the training judge (the exact detector, lenient and
strict); the held-out judges are not computed. Used to choose FK's settings before one run on the test prompts.

    python benchmarks/fk_screen.py --configs diag --out runs/fk_screen/diag

The screening set: ``--per-task`` records per task drawn round-robin from the training prompts (a task with fewer
distinct prompts repeats them; every record has its own noise, record i from ``Generator(seed + i)``), seed 7000
(not the test runs' 1000 / 2000). Every configuration runs at ``--budget`` NFE per prompt from the same seeds;
``paired`` differences are against the best-of-N entry of the same reward (same prompts, same first noise).
Writes ``OUT/results.json`` and ``OUT/report.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

R = {"shapeclip": "shapeclip", "judge": {"shapeworld": 1.0}, "shapevalue": "shapevalue"}
OLD = dict(resample_at=[4, 8, 12], potential="max", noise_level=0.7, sde_until=18, ess_threshold=1.0,
           resampling="multinomial", sde_from=0)  # the first test run's FK settings
# (round 2 ran before sde_from=0 was written here: its "fk_judge_old" got the new default sde_from=4 and is the
# same run as "fk_judge_sdefrom4"; diag ran while the default was still 0, so its entries are as named)
CONFIGS = {
    # what does the sampler cost, what does the steering buy?
    "diag": {
        "bon_shapeclip": ("shapeclip", "best_of_n", {}),
        "fk_sc_old": ("shapeclip", "fk", dict(OLD, lam=1.0)),
        "fk_sc_lam0_eta0.7": ("shapeclip", "fk", dict(OLD, lam=0.0)),
        "fk_sc_lam0_eta0.3": ("shapeclip", "fk", dict(OLD, lam=0.0, noise_level=0.3)),
        "fk_sc_eta0.3": ("shapeclip", "fk", dict(OLD, lam=1.0, noise_level=0.3)),
        "fk_sc_eta0.3_early": ("shapeclip", "fk", dict(OLD, lam=1.0, noise_level=0.3, resample_at=[2, 4, 6, 8])),
        "fk_sc_sdefrom4": ("shapeclip", "fk", dict(OLD, lam=1.0, sde_from=4)),
    },
}
NEW = dict(OLD, sde_from=4)  # diag's best on its own reward: ODE until the first resampling step
CONFIGS["round2"] = {
    "bon_shapeclip": CONFIGS["diag"]["bon_shapeclip"],
    "fk_sc_sdefrom4": CONFIGS["diag"]["fk_sc_sdefrom4"],
    "fk_sc_sdefrom4_lam0.3": ("shapeclip", "fk", dict(NEW, lam=0.3)),
    "fk_sc_sdefrom4_difference": ("shapeclip", "fk", dict(NEW, lam=1.0, potential="difference")),
    "fk_sc_sdefrom6_late": ("shapeclip", "fk", dict(NEW, lam=1.0, resample_at=[6, 10, 14], sde_from=6)),
    "fk_sc_sdefrom4_ess0.5": ("shapeclip", "fk", dict(NEW, lam=1.0, ess_threshold=0.5)),
    "bon_judge": ("judge", "best_of_n", {}),
    "fk_judge_old": ("judge", "fk", dict(OLD, lam=10.0)),
    "fk_judge_sdefrom4": ("judge", "fk", dict(NEW, lam=10.0)),
}
# shapevalue (rewards/shapevalue.py, a value model distilled from the training judge v2 on rollouts of training
# prompts; a probability in [0, 1], so lam on the judge's scale), and the tuned shapeclip / judge settings again for
# their distinct-ancestor counts
CONFIGS["value"] = {
    "bon_shapevalue": ("shapevalue", "best_of_n", {}),
    "fk_sv_lam0": ("shapevalue", "fk", dict(NEW, lam=0.0)),
    "fk_sv_lam3": ("shapevalue", "fk", dict(NEW, lam=3.0)),
    "fk_sv_lam10": ("shapevalue", "fk", dict(NEW, lam=10.0)),
    "fk_sv_lam30": ("shapevalue", "fk", dict(NEW, lam=30.0)),
    "fk_sv_lam10_early": ("shapevalue", "fk", dict(NEW, lam=10.0, resample_at=[2, 4, 6, 8, 10, 12], sde_from=2)),
    "fk_sv_lam10_ess0.5": ("shapevalue", "fk", dict(NEW, lam=10.0, ess_threshold=0.5)),
    "bon_shapeclip": CONFIGS["diag"]["bon_shapeclip"],
    "fk_sc_sdefrom4_ess0.5": CONFIGS["round2"]["fk_sc_sdefrom4_ess0.5"],
    "bon_judge": CONFIGS["round2"]["bon_judge"],
    "fk_judge_sdefrom4": CONFIGS["round2"]["fk_judge_sdefrom4"],
}
# hybrid potentials (2026-12-02, fourth session): shapevalue reads the early x0-hat best (AUC 0.87 at step 4 against
# 0.74 for shapeclip) but is a weak final verifier (best-of-7 by it 0.565 against 0.650 by shapeclip, test prompts),
# and with resampling at 4 / 8 / 12 the final particles descend from about 2 of the 7 initial noises. So: shapevalue
# as the potential (option potential_reward), the final pick by shapeclip or the judge, resampling at step 4 only or
# at 4 / 8 / 12. Compared with best-of-N by the final reward (the same entry as in the other sets)
HYB = dict(NEW, potential_reward="shapevalue")
CONFIGS["hybrid"] = {
    "bon_shapeclip": CONFIGS["diag"]["bon_shapeclip"],
    "fk_hyb_lam10": ("shapeclip", "fk", dict(HYB, lam=10.0)),
    "fk_hyb_once4_lam10": ("shapeclip", "fk", dict(HYB, lam=10.0, resample_at=[4])),
    "fk_hyb_once4_lam3": ("shapeclip", "fk", dict(HYB, lam=3.0, resample_at=[4])),
    "fk_hyb_once4_lam30": ("shapeclip", "fk", dict(HYB, lam=30.0, resample_at=[4])),
    "bon_judge": CONFIGS["round2"]["bon_judge"],
    "fk_hybj_once4_lam10": ("judge", "fk", dict(HYB, lam=10.0, resample_at=[4])),
}
# the rule fixed before round 2 ran: per potential, the FK configuration of diag + round2 with the largest paired
# gain over best-of-N (same reward) in the training judge's strict verdict; ties (within 0.005) by the lenient one.
# lam = 0 entries (no steering: the sampler's cost alone) are diagnostics, not candidates. Entries with another
# potential (option potential_reward) are chosen apart, under "hybrid" (final pick by shapeclip) and "hybrid_judge"


def select(dirs: list[Path]) -> dict:
    recs, tags = {}, None
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        recs.update(res["results"])
        tags = tags or [m["tag"] for m in screening_metadata(res["args"]["per_task"])]
    chosen = {}
    keys = [(rname, rname, False) for rname in R] + [("hybrid", "shapeclip", True), ("hybrid_judge", "judge", True)]
    for key, rname, hybrid in keys:
        ref = next((n for n, q in recs.items() if q["method"] == "best_of_n" and q["reward_name"] == rname), None)
        if ref is None:
            continue
        score = {}
        for n, q in recs.items():
            if q["method"] != "fk" or q["reward_name"] != rname or q["options"].get("lam") == 0 \
                    or ("potential_reward" in q["options"]) != hybrid:
                continue
            d = [paired(tags, [x[k] for x in q["verdicts"]], [x[k] for x in recs[ref]["verdicts"]])[0]
                 for k in ("train_strict", "train")]
            score[n] = (round(d[0] / 0.005), d[1], d[0])
        if not score:
            continue
        best = max(score, key=score.get)
        chosen[key] = {"config": best, "options": recs[best]["options"], "delta_train_strict": score[best][2],
                         "delta_train": score[best][1]}
    return chosen


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="diag", help=f"a set of configurations: {', '.join(CONFIGS)}, or a JSON "
                    "file {name: [reward, method, options]}")
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--budget", type=int, default=288)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="shapeworld")
    ap.add_argument("--out", default="runs/fk_screen")
    ap.add_argument("--reuse", default=None, help="comma-separated earlier OUT dirs: an entry with the same name "
                    "and settings is taken from there instead of rerun")
    ap.add_argument("--select", default=None, help="only: apply the selection rule (select()) to the comma-"
                    "separated OUT dirs' results and write OUT/chosen.json")
    return ap.parse_args(argv)


def screening_metadata(per_task: int) -> list[dict]:
    from flowalign.eval.benchmark import resolve_prompts
    from flowalign.eval.geneval import load_metadata

    by: dict[str, list[dict]] = {}
    for m in load_metadata(resolve_prompts("shapeworld:train")):
        by.setdefault(m["tag"], []).append(m)
    return [ms[i % len(ms)] for ms in by.values() for i in range(per_task)]


def train_verdicts(meta, images) -> list[dict]:
    """The training judge's verdicts only (lenient and strict): the held-out judges stay unseen."""
    from flowalign.eval.judges import verdicts

    out = []
    for m, img in zip(meta, images):
        v = verdicts(m, img)
        out.append({"train": bool(v["train"][0]), "train_strict": bool(v["train_strict"][0]),
                    "partial": float(v["train"][1])})
    return out


def task_mean(tags, x) -> float:
    by: dict[str, list[float]] = {}
    for t, v in zip(tags, x):
        by.setdefault(t, []).append(float(v))
    return float(np.mean([np.mean(v) for v in by.values()]))


def paired(tags, a, b) -> tuple[float, float]:
    by: dict[str, list[float]] = {}
    for t, x, y in zip(tags, a, b):
        by.setdefault(t, []).append(float(x) - float(y))
    se = [np.std(v, ddof=1) / math.sqrt(len(v)) for v in by.values()]
    return float(np.mean([np.mean(v) for v in by.values()])), math.sqrt(sum(s * s for s in se)) / len(se)


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    torch.set_num_threads(a.threads)
    from diffusers.utils import logging as dlog
    from flowalign.pipelines.base import load_adapter
    from flowalign.rewards import to_uint8

    from flowalign import noise
    from flowalign.trainer import resolve_model_path

    dlog.disable_progress_bar()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.select:
        chosen = select([Path(d) for d in a.select.split(",")])
        (out / "chosen.json").write_text(json.dumps(chosen, indent=1))
        print(json.dumps(chosen, indent=1))
        return 0
    configs = CONFIGS[a.configs] if a.configs in CONFIGS else json.loads(Path(a.configs).read_text())
    reuse = {}
    for d in (a.reuse.split(",") if a.reuse else []):
        reuse.update(json.loads((Path(d) / "results.json").read_text())["results"])
    adapter = load_adapter(resolve_model_path(a.model))
    meta = screening_metadata(a.per_task)
    prompts, tags = [m["prompt"] for m in meta], [m["tag"] for m in meta]
    used = {rname for rname, _, _ in configs.values()}
    rewards = {k: noise.resolve_reward(v) for k, v in R.items() if k in used}
    recs = {}
    for name, (rname, method, opts) in configs.items():
        q = reuse.get(name)
        if q is not None and (q["reward_name"], q["method"], q["options"]) == (rname, method, opts):
            recs[name] = dict(q, reused=True)  # the same prompts, seeds and settings: the same result
            print(f"{name}: reused", flush=True)
            continue
        t0 = time.perf_counter()
        res = noise.optimize(adapter, prompts, rewards[rname], method, a.budget, a.seed, metadata=meta,
                             guidance=a.guidance, num_steps=a.steps, **opts)
        v = train_verdicts(meta, to_uint8(res.images))
        rec = {"reward_name": rname, "method": method, "options": opts, "nfe_per_prompt": res.nfe_per_prompt,
               "seconds": time.perf_counter() - t0, "reward": [float(x) for x in res.rewards["reward"]],
               "verdicts": v}
        if "ess" in res.info:
            rec["mean_ess"] = [float(np.mean(e)) for e in res.info["ess"]]
            # distinct ancestors (initial noises) among each prompt's final particles
            rec["final_particle_rewards"] = res.info["final_particle_rewards"]
            rec["ancestors"] = res.info["ancestors"]
            rec["final_ancestors"] = res.info["final_ancestors"]
        recs[name] = rec
        print(f"{name}: {rec['seconds']:.0f} s, reward {np.mean(rec['reward']):.3f}, train "
              f"{task_mean(tags, [x['train'] for x in v]):.3f}, train strict "
              f"{task_mean(tags, [x['train_strict'] for x in v]):.3f}", flush=True)
    lines = [f"FK screening on ShapeWorld training prompts ({a.per_task} records per task, {len(meta)} in all), seed "
             f"{a.seed}, budget {a.budget} NFE/prompt, CFG {a.guidance}, {a.steps} steps. Training judge only "
             "(mean over tasks); Δ paired vs best-of-N with the same reward.", "",
             "| config | reward | NFE | reward mean | train | train strict | Δ train vs BoN | Δ train strict vs BoN "
             "| Δ reward vs BoN | mean ESS | distinct ancestors (of K) | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in recs.items():
        ref = next((n for n, q in recs.items() if q["method"] == "best_of_n" and q["reward_name"] == r["reward_name"]),
                   None)
        cells = []
        for key in ("train", "train_strict", "reward"):
            if ref is None or ref == name:
                cells.append("–")
                continue
            get = (lambda q: q["reward"]) if key == "reward" else (lambda q, k=key: [x[k] for x in q["verdicts"]])
            dm, dse = paired(tags, get(r), get(recs[ref]))
            cells.append(f"{dm:+.3f} ± {dse:.3f}")
        ess = [round(e, 2) for e in r.get("mean_ess", [])]
        anc = "–"
        if "final_ancestors" in r:
            steps = [round(float(np.mean(x)), 2) for x in r["ancestors"]]
            anc = f"{steps} → final {np.mean(r['final_ancestors']):.2f} (1: {np.mean(np.array(r['final_ancestors']) == 1):.0%})"
        lines.append(f"| {name} | {r['reward_name']} | {r['nfe_per_prompt']:.0f} | {np.mean(r['reward']):.3f} | "
                     f"{task_mean(tags, [x['train'] for x in r['verdicts']]):.3f} | "
                     f"{task_mean(tags, [x['train_strict'] for x in r['verdicts']]):.3f} | {cells[0]} | {cells[1]} | "
                     f"{cells[2]} | {ess or '–'} | {anc} | {r['seconds']:.0f} |")
    lines += ["", "Options:", ""] + [f"- {n}: `{r['method']}` {json.dumps(r['options'])}" for n, r in recs.items()]
    md = "\n".join(lines)
    (out / "report.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": recs}))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
