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
    from flowalign.eval.benchmark import format_table, run
    from flowalign.trainer import resolve_model_path

    res = run(resolve_model_path(a.model), a.benchmark, a.out, a.steps, a.guidance, a.seed, a.n_per_task,
              lora=a.lora)
    print(format_table({a.benchmark: res}))
    if "judges" in res:
        from flowalign.eval.benchmark import format_judges_table

        print()
        print(format_judges_table({a.benchmark: res}))
    print(f"wrote {a.out}/eval.json, {a.out}/samples.png and {a.out}/audit.png (images on which the judges disagree)")
    return 0


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from flowalign.train import main as train_main

        return train_main(argv[1:])
    ap = argparse.ArgumentParser(prog="flowalign", description="Reward alignment for diffusion/flow models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="fine-tune by reward: flowalign train --config configs/X.yaml")
    e = sub.add_parser("eval", help="generate and score a benchmark")
    e.add_argument("--model", default="shapeworld", help="pipeline dir, hub id, or 'shapeworld'")
    e.add_argument("--benchmark", default="shapeworld-geneval")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--trained", "--lora", dest="lora", default=None,
                   help="a run's final/ directory to apply on top (LoRA weights or transformer/), or a full "
                        "fine-tuning checkpoint (runs/X/checkpoints/iter_N)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=2.0)
    e.add_argument("--seed", type=int, default=1000)
    e.add_argument("--n-per-task", type=int, default=None)
    sub.add_parser("optimize-noise", help="ReNO / CARINOX noise optimisation (not yet available)")
    sub.add_parser("demo", help="Gradio demo (not yet available)")
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
