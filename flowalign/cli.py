"""The ``flowalign`` command: train | eval | optimize-noise | demo | shapeworld ... | doctor.
Each subcommand is a thin call into the Python API. Bad input ends with one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_guarded(fn) -> int:
    """Run fn(); turn the errors a user can fix into one line on stderr and exit code 2."""
    from flowalign.config import ConfigError
    from flowalign.eval.geneval import MetadataError
    from flowalign.rewards.base import RewardError

    try:
        return fn() or 0
    except (ConfigError, MetadataError, RewardError, FileNotFoundError, ValueError) as e:
        print(f"flowalign: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ == "TrainingError":
            print(f"flowalign: error: {e}", file=sys.stderr)
            return 3
        raise


def _eval(a) -> int:
    from flowalign.eval.cli_eval import run_eval

    return run_eval(a)


def _shapeworld(a) -> int:
    if a.sw_cmd == "prompts":
        from flowalign.shapeworld.prompts import write_prompt_files

        for name, p in write_prompt_files(a.out, a.seed, a.n_per_task).items():
            print(f"{name}: {p}")
    elif a.sw_cmd == "pretrain":
        import torch

        from flowalign.shapeworld.pretrain import Recipe, pretrain

        torch.set_num_threads(a.threads)
        r = Recipe(seed=a.seed, **({"steps": a.steps} if a.steps else {}),
                   **({"vae_steps": a.vae_steps} if a.vae_steps else {}))
        print(f"pre-trained pipeline written to {pretrain(a.out, r)}")
    elif a.sw_cmd == "render":
        from flowalign.shapeworld.world import render_batch

        from flowalign.eval.benchmark import save_grid

        imgs, metas = render_batch(48, a.seed)
        print(save_grid(imgs, metas, a.out))
    return 0


def _optimize_noise(a) -> int:
    import json

    from flowalign import noise
    from flowalign.pipelines.base import load_adapter
    from flowalign.trainer import resolve_model_path

    method = noise.canonical_method(a.method)
    takes = {"reno": "steps", "carinox": "steps", "best_of_n": "n", "fk": "particles"}[method]
    for flag, val in (("steps", a.steps), ("n", a.n), ("particles", a.particles)):
        if val is not None and val <= 0:
            raise noise.NoiseOptError(f"--{flag} must be a positive integer, got {val}")
    if a.steps is not None and method not in ("reno", "carinox"):
        raise noise.NoiseOptError(f"--steps counts ReNO/CARINOX iterations; method {method} takes --{takes} "
                                  f"(or --budget)")
    if a.prompt is not None and a.prompts is not None:
        raise noise.NoiseOptError("give --prompt or --prompts, not both")
    if a.prompts is not None:
        from flowalign.eval.benchmark import resolve_prompts, subsample
        from flowalign.eval.geneval import load_metadata

        metadata = subsample(load_metadata(resolve_prompts(a.prompts)), a.n_per_task)
    elif a.prompt is not None:
        if not a.prompt.strip():
            raise noise.NoiseOptError("--prompt is empty")
        metadata = [noise.metadata_for_prompt(a.prompt) or {"tag": "prompt", "prompt": a.prompt}]
    else:
        raise noise.NoiseOptError("give a --prompt TEXT or a --prompts FILE (GenEval metadata .jsonl)")
    opts = {k: v for k, v in {"iterations": a.steps, "n": a.n, "particles": a.particles,
                              "sampler_steps": a.sampler_steps, "lr": a.lr, "potential": a.potential,
                              "resampling": a.resampling, "lam": a.lam, "ess_threshold": a.ess_threshold,
                              "noise_level": a.noise_level, "n_explore": a.n_explore, "top_k": a.top_k}.items()
            if v is not None}
    if a.potential_reward:
        if method != "fk":
            raise noise.NoiseOptError("--potential-reward applies to --method fk only")
        opts["potential_reward"] = noise.resolve_reward(noise.parse_reward_args(a.potential_reward))
    if a.resample_at is not None:
        if method != "fk":
            raise noise.NoiseOptError("--resample-at applies to --method fk only")
        try:
            opts["resample_at"] = [int(x) for x in a.resample_at.split(",") if x.strip()]
        except ValueError:
            raise noise.NoiseOptError(f"--resample-at takes comma-separated step indices, got {a.resample_at!r}") \
                from None
    if a.category_rewards:
        if method != "carinox":
            raise noise.NoiseOptError("--category-rewards applies to --method carinox only")
        try:
            opts["category_rewards"] = json.loads(open(a.category_rewards).read())
        except (OSError, json.JSONDecodeError) as e:
            raise noise.NoiseOptError(f"--category-rewards {a.category_rewards}: {e}") from None
    spec = noise.parse_reward_args(a.reward)
    reward = noise.resolve_reward(spec)  # unknown names fail before the model loads
    if method in ("reno", "carinox"):
        noise.check_differentiable(reward, method)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    adapter = load_adapter(resolve_model_path(a.model))
    res = noise.run_to_dir(adapter, metadata, reward, method, a.out, budget=a.budget, seed=a.seed,
                           guidance=a.guidance, num_steps=a.sample_steps, chunk=a.batch_size, **opts)
    print(f"{res['method']}: reward {res['reward_before_mean']:.4f} -> {res['reward_after_mean']:.4f} "
          f"(mean over {len(metadata)} prompt(s)); {res['nfe_per_prompt']:.0f} NFE and "
          f"{res['seconds_per_prompt']:.2f} s per prompt, peak memory {res['peak_memory_mb']:.0f} MB")
    if "judges" in res:
        j = res["judges"]
        print(f"held-out strict judge ({j['headline']}): {j['before'][j['headline']]:.3f} -> "
              f"{j['after'][j['headline']]:.3f}")
    print(f"wrote {a.out}/result.json, before_after.png, reward_curve.png and images/")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from flowalign.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["demo"]:  # its own parser (flowalign/app/app.py), imported only when asked for
        from flowalign.app.app import main as demo_main

        return demo_main(argv[1:])
    ap = argparse.ArgumentParser(prog="flowalign", description="Reward alignment for diffusion/flow models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="fine-tune by reward: flowalign train --config configs/X.yaml")
    from flowalign.eval.cli_eval import add_eval_args

    add_eval_args(sub.add_parser("eval", help="generate and score benchmarks with one or more models; one report"))
    o = sub.add_parser("optimize-noise", help="inference-time alignment: best-of-N, ReNO, CARINOX, FK steering")
    o.add_argument("--model", default="shapeworld", help="pipeline dir, hub id, or 'shapeworld'")
    o.add_argument("--prompt", default=None, help="one prompt")
    o.add_argument("--prompts", default=None,
                   help="GenEval metadata .jsonl (or .txt, one prompt a line, or shapeworld:test): a batch")
    o.add_argument("--n-per-task", type=int, default=None, help="with --prompts: the first N records of each task")
    o.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]",
                   help="reward to maximise, repeatable (weighted sum); default shapeclip=1")
    o.add_argument("--method", default="reno", help="best_of_n (bon) | reno | carinox | fk")
    o.add_argument("--steps", type=int, default=None, help="ReNO / CARINOX gradient iterations (default 50)")
    o.add_argument("--n", type=int, default=None, help="best-of-N candidates")
    o.add_argument("--particles", type=int, default=None, help="FK steering particles")
    o.add_argument("--budget", type=int, default=None,
                   help="NFE (transformer forwards) per prompt; sets the count that is not given")
    o.add_argument("--sample-steps", type=int, default=20, help="ODE/SDE sampling steps of the full sampler")
    o.add_argument("--sampler-steps", type=int, default=None, help="ReNO's differentiable few-step sampler (1-4)")
    o.add_argument("--guidance", type=float, default=3.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--n-explore", type=int, default=None, help="CARINOX exploration noises")
    o.add_argument("--top-k", type=int, default=None, help="CARINOX seeds optimised")
    o.add_argument("--category-rewards", default=None, help="CARINOX: JSON file {category: reward spec}")
    o.add_argument("--potential", default=None, help="FK: max | difference | sum")
    o.add_argument("--resampling", default=None, help="FK: multinomial | systematic")
    o.add_argument("--lam", type=float, default=None, help="FK: potential temperature lambda")
    o.add_argument("--ess-threshold", type=float, default=None, help="FK: resample when ESS < this x particles")
    o.add_argument("--noise-level", type=float, default=None, help="FK: SDE noise level")
    o.add_argument("--potential-reward", action="append", default=None, metavar="NAME[=WEIGHT]",
                   help="FK: score the resampling steps' predicted images with this reward (repeatable) instead "
                        "of --reward, which still picks the final particle (e.g. shapevalue)")
    o.add_argument("--resample-at", default=None, help="FK: comma-separated resampling step indices, e.g. 4")
    o.add_argument("--batch-size", type=int, default=32, help="prompts per optimisation batch")
    o.add_argument("--out", default="runs/optimize_noise")
    sub.add_parser("demo", help="Gradio demo on 127.0.0.1: compare models, live noise optimisation, runs "
                                "(flowalign demo --help)")
    sw = sub.add_parser("shapeworld", help="ShapeWorld tools")
    swsub = sw.add_subparsers(dest="sw_cmd", required=True)
    p = swsub.add_parser("prompts", help="write the GenEval-format prompt files")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-task", type=int, default=100)
    p = swsub.add_parser("pretrain", help="pre-train the tiny SD3 pipeline from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="transformer steps (recipe default if omitted)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p = swsub.add_parser("render", help="write a grid of random renders")
    p.add_argument("--out", default="renders.png")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("doctor", help="print versions and what this machine can run")
    a = ap.parse_args(argv)
    if a.cmd == "eval":
        return run_guarded(lambda: _eval(a))
    if a.cmd == "optimize-noise":
        return run_guarded(lambda: _optimize_noise(a))
    if a.cmd == "shapeworld":
        if a.sw_cmd == "prompts" and a.out is None:
            from flowalign.shapeworld.prompts import DATA_DIR
            a.out = DATA_DIR
        return run_guarded(lambda: _shapeworld(a))
    if a.cmd == "doctor":
        import torch

        import diffusers
        import transformers

        print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()}), diffusers {diffusers.__version__}, "
              f"transformers {transformers.__version__}")
        from flowalign.rewards import known_rewards
        print("rewards:", ", ".join(known_rewards()))
        return 0
    print(f"flowalign: error: '{a.cmd}' is not available yet in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
