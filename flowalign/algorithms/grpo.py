"""Flow-GRPO: group-normalised advantages and the PPO-clipped per-step policy loss on stored SDE transitions.

- ``group_advantages``: A_i = (r_i - mean_g) / (std_g + eps), std over the prompt's group (population std) or, with
  ``global_std``, over the whole batch; groups whose rewards are all equal get A = 0; then clipped to +-adv_clip.
- ``clipped_policy_loss``: per stored step, r = exp(log p_theta - log p_old) and
  L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))).
- ``GRPO``: rolls out with the SDE (log-probs stored), replays the chosen steps (all stochastic ones or the first
  K, a random fraction of them, optionally weighted by their std), adds beta x the exact per-step Gaussian KL to the
  frozen reference (``samplers.gaussian_kl``, the |dt| factor included: beta does not carry over from flow_grpo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from flowalign import seeding
from flowalign.rollout import replay_step, step_rows, trained_steps
from flowalign.samplers import gaussian_kl, step_std

from .base import Algorithm, RolloutSpec, Work, nonzero_advantages


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = False, eps: float = 1e-4,
                     adv_clip: float | None = 5.0) -> torch.Tensor:
    rewards = rewards.float()
    adv = torch.zeros_like(rewards)
    gstd = rewards.std(unbiased=False)
    for g in torch.unique(group_ids):
        m = group_ids == g
        r = rewards[m]
        if r.std(unbiased=False) < 1e-12:  # all equal: no signal (and no 0/0 when eps = 0)
            continue
        std = gstd if global_std else r.std(unbiased=False)
        adv[m] = (r - r.mean()) / (std + eps)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    return adv


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl": 0.5 * diff.pow(2).mean().item(),
                 "ratio_dev": (ratio - 1).abs().max().item()}
    return loss, stats


def grpo_step_loss(log_prob, old_log_prob, adv, clip_range: float, beta: float = 0.0,
                   kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One replayed step's loss: the clipped policy loss plus beta x mean(kl) (kl per sample, when beta > 0)."""
    loss, stats = clipped_policy_loss(log_prob, old_log_prob, adv, clip_range)
    stats["policy_loss"] = loss.item()
    if kl is not None and beta > 0:
        loss = loss + beta * kl.mean()
        stats["kl"] = kl.mean().item()
    return loss, stats


def check_train_steps(spec: str, err) -> None:
    """``train_steps`` of the policy-gradient algorithms: 'sde' (all stochastic steps) or 'first:K'."""
    if spec != "sde" and not (spec.startswith("first:") and spec[6:].isdigit() and int(spec[6:]) > 0):
        err("algorithm.train_steps", f"use 'sde' or 'first:K' (K >= 1), got {spec!r}")


@dataclass
class GRPOConfig:
    name: Literal["grpo"] = "grpo"
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    global_std: bool = False
    beta: float = 0.0                  # weight of the exact per-step Gaussian KL to the reference
    train_steps: str = "sde"           # which stochastic steps are trained: 'sde' (all of them) or 'first:K'
    timestep_fraction: float = 1.0     # random fraction of those, redrawn every iteration (flow_grpo)
    step_weighting: Literal["uniform", "std"] = "uniform"  # 'std': loss of step i x std_i / mean std
    granularities: list = field(default_factory=list)  # G2RPO: extra completions every g-th step, e.g. [2, 4]

    def validate(self, err) -> None:
        if not self.clip_range > 0:
            err("algorithm.clip_range", f"must be > 0, got {self.clip_range}")
        if not self.adv_clip > 0:
            err("algorithm.adv_clip", f"must be > 0, got {self.adv_clip}")
        if self.beta < 0:
            err("algorithm.beta", f"must be >= 0, got {self.beta}")
        if not 0 < self.timestep_fraction <= 1:
            err("algorithm.timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check_train_steps(self.train_steps, err)
        if not isinstance(self.granularities, list) or not all(isinstance(g, int) and not isinstance(g, bool)
                                                                 and g >= 1 for g in self.granularities):
            err("algorithm.granularities", f"a list of integers >= 1 (every g-th remaining step), "
                                           f"got {self.granularities!r}")


class GRPO(Algorithm):
    name = "grpo"
    Config = GRPOConfig
    stochastic = True

    def __init__(self, cfg: GRPOConfig, ctx):
        super().__init__(cfg, ctx)
        s = ctx.sample
        self.step_pool = trained_steps(ctx.sde_mask, cfg.train_steps)
        if not self.step_pool:
            from flowalign.config import ConfigError

            raise ConfigError(f"algorithm.train_steps: {cfg.train_steps!r} leaves no stochastic step to train "
                              f"(sample.sde_steps: {s.sde_steps!r}); GRPO needs at least one")
        self.step_std = [step_std(ctx.sigmas, i, s.noise_level, s.kernel) for i in range(s.num_steps)]

    def policies(self):
        return ("reference",) if self.cfg.beta > 0 else ()

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic=True, branch_steps=list(self.step_pool),
                           completions=tuple(self.cfg.granularities))

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Group advantages; with G2RPO granularities (rewards (B, 1 + n), one column per completion) the mean of
        each column's group-normalised advantages (multi-granularity integration), then clipped."""
        c = self.cfg
        if rewards.ndim == 1:
            return group_advantages(rewards, groups, c.global_std, adv_clip=c.adv_clip)
        cols = [group_advantages(rewards[:, j], groups, c.global_std, adv_clip=None) for j in range(rewards.shape[1])]
        return torch.stack(cols, 1).mean(1).clamp(-c.adv_clip, c.adv_clip)

    def plan(self, traj, adv, it, gen) -> Work:
        c = self.cfg
        rng = seeding.rng(self.ctx.seed, "grpo/steps", it)
        k = max(1, round(c.timestep_fraction * len(self.step_pool)))
        # branching: every sample is trained on its own stochastic step (the pool holds them all)
        steps = list(self.step_pool) if traj.sde_mask.ndim == 2 else sorted(rng.sample(self.step_pool, k))
        w = {j: 1.0 for j in steps}
        if c.step_weighting == "std":
            m = float(np.mean([self.step_std[j] for j in steps]))
            w = {j: float(self.step_std[j]) / m for j in steps}
        # samples with zero advantage (groups that all scored the same) carry no policy gradient: skip them, as
        # flow_grpo does (with beta > 0 they would only add KL; the other samples keep that term)
        return Work(traj, adv, nonzero_advantages(adv, self.ctx.world), info={"steps": steps, "weights": w})

    def parts(self, work: Work) -> list:
        steps, mask = work.info["steps"], work.traj.sde_mask
        if mask.ndim == 2 and self.ctx.world == 1:  # per-sample steps: only the steps some sample here is at
            return [j for j in steps if len(step_rows(mask, j, len(work)))]
        return list(steps)

    def loss(self, fwd, work: Work, j: int):
        sub, a, scale = work.traj, work.adv, 1.0 / len(work.info["steps"])
        if sub.sde_mask.ndim == 2:  # per-sample steps: the rows stochastic at j, weighted by their share
            rows = step_rows(sub.sde_mask, j, len(sub))
            # (with several processes every one runs the same backward passes: a zero-weight row)
            scale = len(rows) / len(sub)
            rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)
            sub, a = sub.index(rows), a[rows.to(a.device)]
        kernel = self.ctx.sample.kernel
        out = replay_step(fwd, sub, j, kernel=kernel)
        kl = None
        if self.cfg.beta > 0:
            ref = replay_step(fwd, sub, j, kernel=kernel, policy="reference")
            kl = gaussian_kl(out.mean, ref.mean, out.std)
        loss, stats = grpo_step_loss(out.log_prob, sub.log_probs[:, j], a, self.cfg.clip_range, self.cfg.beta, kl)
        return loss * work.info["weights"][j] * scale, stats
