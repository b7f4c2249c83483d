"""How much signal is in one iteration's policy gradient?

Draws ``--batches`` independent rollout batches of the *same* prompts (a config's sampler, fresh noise each time),
computes the gradient of each through the config's algorithm (GRPO's policy gradient on the trained steps,
DiffusionNFT's or AWM's loss at the noise levels it draws; on-policy, from the start weights), and prints the mean
pairwise cosine between them. Two independent unbiased estimates g1, g2 of a gradient with signal s and per-batch noise n
have E[cos] ~ |s|^2 / (|s|^2 + E|n|^2): near 0 means one batch's update is mostly noise, and the signal only
accumulates over many iterations (the displacement's signal-to-noise grows like sqrt(iterations)).

usage: python benchmarks/grad_snr.py --config configs/shapeworld_flow_grpo.yaml [section.key=value ...]
       [--batches 8] [--brightness]
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from flowalign.config import load_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--brightness", action="store_true", help="use mean brightness as the reward (a smooth reference)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from flowalign.trainer import Trainer

    cfg = load_config(a.config, ["run.output_dir=/tmp/flowalign_grad_snr", "run.resume=false"] + a.overrides)
    tr = Trainer(cfg)
    if a.brightness:
        tr.reward = lambda images, prompts, meta: {"reward": images.mean(dim=(1, 2, 3))}
    first = tr.prompts_for
    tr.prompts_for = lambda it: first(0)  # the same prompts every time, new noise (collect seeds by iteration)

    def grad(it: int) -> torch.Tensor:
        """The gradient of one iteration's whole training work (every kept sample in one micro-batch), through the
        algorithm's own plan / parts / loss: the same code the trainer runs."""
        traj, r, groups = tr.collect(it)
        adv, _ = tr.advantages(r["reward"], groups)
        work = tr.algo.plan(traj, adv, it, torch.Generator().manual_seed(it))
        mb = work.index(work.keep)
        tr.opt.zero_grad(set_to_none=True)
        for part in tr.algo.parts(mb):
            loss, _ = tr.algo.loss(tr.fwd, mb, part)
            loss.backward()
        return torch.cat([p.grad.flatten() for p in tr.params if p.grad is not None]).clone()

    gs = [grad(1000 + k) for k in range(a.batches)]
    cos = [torch.nn.functional.cosine_similarity(x, y, dim=0).item() for x, y in itertools.combinations(gs, 2)]
    res = {"mean_cos": statistics.mean(cos), "sd_cos": statistics.stdev(cos), "pairs": len(cos),
           "samples_per_batch": cfg.sample.prompts_per_iter * cfg.sample.group_size,
           "algorithm": cfg.algorithm.name, "steps": getattr(tr.algo, "step_pool", None)}
    print(f"{res['algorithm']}: mean pairwise cosine of {a.batches} independent batch gradients "
          f"({res['samples_per_batch']} samples, steps {res['steps']}): {res['mean_cos']:.4f} "
          f"(sd over pairs {res['sd_cos']:.4f})")
    return res


if __name__ == "__main__":
    main()
