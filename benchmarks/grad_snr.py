"""How much signal is in one iteration's policy gradient?

Draws ``--batches`` independent rollout batches of the *same* prompts (a config's sampler, fresh noise each time),
computes the GRPO policy gradient of each on the trained steps (beta 0, on-policy), and prints the mean pairwise
cosine between them. Two independent unbiased estimates g1, g2 of a gradient with signal s and per-batch noise n
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
from flowalign.rollout import replay_step, step_rows


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

    cfg = load_config(a.config, ["run.output_dir=/tmp/flowalign_grad_snr", "run.resume=false", "train.beta=0"]
                      + a.overrides)
    tr = Trainer(cfg)
    if a.brightness:
        tr.reward = lambda images, prompts, meta: {"reward": images.mean(dim=(1, 2, 3))}
    first = tr.prompts_for
    tr.prompts_for = lambda it: first(0)  # the same prompts every time, new noise (collect seeds by iteration)

    def grad(it: int) -> torch.Tensor:
        traj, r, groups = tr.collect(it)
        adv, _ = tr.advantages(r["reward"], groups)
        keep = (adv != 0).nonzero().view(-1)
        sub, adv = traj.index(keep), adv[keep]
        tr.opt.zero_grad(set_to_none=True)
        for j in tr.step_pool:
            rows = step_rows(sub.sde_mask, j, len(sub))  # all rows, or those branched at j
            if len(rows) == 0:
                continue
            part = sub.index(rows)
            out = replay_step(tr.adapter, part, j, kernel=cfg.sample.kernel)
            (-(adv[rows] * torch.exp(out.log_prob - part.log_probs[:, j])).sum() / len(sub)).backward()
        return torch.cat([p.grad.flatten() for p in tr.params if p.grad is not None]).clone()

    gs = [grad(1000 + k) for k in range(a.batches)]
    cos = [torch.nn.functional.cosine_similarity(x, y, dim=0).item() for x, y in itertools.combinations(gs, 2)]
    res = {"mean_cos": statistics.mean(cos), "sd_cos": statistics.stdev(cos), "pairs": len(cos),
           "samples_per_batch": cfg.sample.prompts_per_iter * cfg.sample.group_size, "steps": tr.step_pool}
    print(f"mean pairwise cosine of {a.batches} independent batch gradients ({res['samples_per_batch']} samples, "
          f"steps {tr.step_pool}): {res['mean_cos']:.4f} (sd over pairs {res['sd_cos']:.4f})")
    return res


if __name__ == "__main__":
    main()
