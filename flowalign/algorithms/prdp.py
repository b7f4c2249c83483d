"""PRDP (Deng et al. 2024): proximal reward-difference prediction. Instead of a policy gradient, a regression:
for a pair (a, b) of trajectories of one prompt, the policy's implied reward difference

    d_hat = beta * ( mean_t c_t(a) - mean_t c_t(b) ),   c_t = clip(log p_theta(x_{t-1}|x_t) - log p_old(...),
                                                                   log(1 - eps), log(1 + eps))

over the trained SDE steps t (the stored log-probs are the sampling policy's: "old" is the policy that sampled
this iteration, so the regression is online), is regressed onto the pair's reward difference

    L = mean_pairs ( d_hat - scale * (y_a - y_b) )^2,   y = the group-normalised advantage ('advantage') or the
                                                          raw reward ('reward')

The clip is the proximal part: once a step's ratio leaves [1 - eps, 1 + eps] it carries no more gradient, and the
regression target itself is bounded (the policy stops moving a pair once it predicts its reward difference), which
is the claimed source of PRDP's stability where a policy gradient keeps pushing. The mean over steps (not the
paper's sum) keeps beta independent of how many steps are trained.

Pairs are formed within a prompt group on this process ('adjacent': members shuffled and paired two by two;
'all': every pair of the group); a sample left without a partner (odd groups, groups split across processes) is
paired with another leftover at weight 0, so every process runs the same number of pairs. Pairs stay together in a
micro-batch (``Work.unit = 2``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from flowalign import seeding
from flowalign.rollout import replay_step, trained_steps

from .base import Algorithm, RolloutSpec, Work
from .grpo import check_train_steps


def prdp_loss(log_ratio: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, beta: float,
              clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``log_ratio`` (2P, K): per trained step, log p_theta - log p_old of rows [a_1, b_1, a_2, b_2, ...];
    ``target`` (P,) the pairs' (scaled) reward differences y_a - y_b; ``weight`` (P,) 1 or 0 (padding pairs)."""
    lo, hi = math.log(1 - clip_range), math.log(1 + clip_range)
    c = log_ratio.clamp(lo, hi).mean(1).view(-1, 2)
    pred = beta * (c[:, 0] - c[:, 1])
    err = (pred - target).pow(2)
    loss = (weight * err).sum() / weight.sum().clamp_min(1)
    with torch.no_grad():
        n = weight.sum().clamp_min(1)
        stats = {"prdp_mse": float((weight * err).sum() / n),
                 "target_var": float((weight * target.pow(2)).sum() / n),
                 "clipfrac": float(((log_ratio < lo) | (log_ratio > hi)).float().mean()),
                 "ratio_dev": float((log_ratio.exp() - 1).abs().max())}
    return loss, stats


def make_pairs(groups: torch.Tensor, keep: torch.Tensor, how: str, rng) -> tuple[list[int], list[float]]:
    """Row order [a_1, b_1, a_2, b_2, ...] of pairs within groups and each pair's weight (0 for padding pairs)."""
    by: dict[int, list[int]] = {}
    for i in keep.tolist():
        by.setdefault(int(groups[i]), []).append(i)
    rows, weights, left = [], [], []
    for g in sorted(by):
        m = by[g]
        if how == "all":
            for x in range(len(m)):
                for y in range(x + 1, len(m)):
                    rows += [m[x], m[y]]
                    weights.append(1.0)
            continue
        rng.shuffle(m)
        for x in range(0, len(m) - 1, 2):
            rows += [m[x], m[x + 1]]
            weights.append(1.0)
        if len(m) % 2:
            left.append(m[-1])
    for x in range(0, len(left) - 1, 2):  # leftovers: pairs of different groups, trained at weight 0
        rows += [left[x], left[x + 1]]
        weights.append(0.0)
    if len(left) % 2:
        rows += [left[-1], left[-1]]
        weights.append(0.0)
    return rows, weights


@dataclass
class PRDPConfig:
    name: Literal["prdp"] = "prdp"
    beta: float = 1.0e4               # implied-reward scale: d_hat = beta x mean step log-ratio difference
    clip_range: float = 1.0e-4        # proximal clip of each step's ratio to [1 - eps, 1 + eps]
    target: Literal["advantage", "reward"] = "advantage"
    scale: float = 1.0                # target = scale x (y_a - y_b)
    adv_clip: float = 5.0
    global_std: bool = False
    pairing: Literal["adjacent", "all"] = "adjacent"
    train_steps: str = "sde"          # 'sde' or 'first:K', as GRPO
    timestep_fraction: float = 1.0

    def validate(self, err) -> None:
        if not self.beta > 0:
            err("algorithm.beta", f"must be > 0, got {self.beta}")
        if not 0 < self.clip_range < 1:
            err("algorithm.clip_range", f"must be in (0, 1), got {self.clip_range}")
        if not self.scale > 0:
            err("algorithm.scale", f"must be > 0, got {self.scale}")
        if not self.adv_clip > 0:
            err("algorithm.adv_clip", f"must be > 0, got {self.adv_clip}")
        if not 0 < self.timestep_fraction <= 1:
            err("algorithm.timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check_train_steps(self.train_steps, err)


class PRDP(Algorithm):
    name = "prdp"
    Config = PRDPConfig
    stochastic = True

    def __init__(self, cfg: PRDPConfig, ctx):
        super().__init__(cfg, ctx)
        self.step_pool = trained_steps(ctx.sde_mask, cfg.train_steps)
        if not self.step_pool:
            from flowalign.config import ConfigError

            raise ConfigError(f"algorithm.train_steps: {cfg.train_steps!r} leaves no stochastic step to train")
        if ctx.sample.branching:
            from flowalign.config import ConfigError

            raise ConfigError("sample.branching: PRDP sums log-ratios over a trajectory's steps; use it without "
                              "branching (one stochastic step per group)")

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic=True)

    def advantages(self, rewards, groups):
        """The regression's per-sample signal y: group-normalised advantages, or the raw rewards (a pair's
        difference is the same whatever the group's offset)."""
        if self.cfg.target == "reward":
            return rewards.float()
        return super().advantages(rewards, groups)

    def plan(self, traj, adv, it, gen) -> Work:
        c = self.cfg
        rng = seeding.rng(self.ctx.seed, "prdp/pairs", it)
        k = max(1, round(c.timestep_fraction * len(self.step_pool)))
        steps = sorted(seeding.rng(self.ctx.seed, "prdp/steps", it).sample(self.step_pool, k))
        groups = traj.groups if traj.groups is not None else torch.zeros(len(traj), dtype=torch.long)
        rows, weights = make_pairs(groups, torch.arange(len(traj)), c.pairing, rng)
        rows_t = torch.tensor(rows, dtype=torch.long)
        w = torch.tensor(weights).repeat_interleave(2)
        y = adv.float()
        # the pair rows become the work's samples (a sample may sit in several pairs with pairing: all)
        work = Work(traj, adv, torch.arange(len(traj)), info={"steps": steps}).index(rows_t)
        work.extra, work.unit = {"w": w, "y": y[rows_t.to(y.device)].cpu()}, 2
        return work

    def loss(self, fwd, work: Work, part):
        c, tr = self.cfg, work.traj
        lr = torch.stack([replay_step(fwd, tr, j, kernel=self.ctx.sample.kernel).log_prob - tr.log_probs[:, j]
                          for j in work.info["steps"]], 1)
        y = work.extra["y"].to(lr).view(-1, 2)
        target = c.scale * (y[:, 0] - y[:, 1])
        loss, stats = prdp_loss(lr, target, work.extra["w"].to(lr).view(-1, 2)[:, 0], c.beta, c.clip_range)
        stats["policy_loss"] = loss.item()
        return loss, stats
