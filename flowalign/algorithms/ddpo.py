"""DDPO (Black et al. 2023, DDPO_IS): the classic policy-gradient baseline for DDPM models.

- rollouts with the stochastic DDIM sampler (``sample.kernel: ddim``, eta = ``sample.noise_level``, 1 in the paper)
  store every step's log-prob; on a flow model the same algorithm runs on whichever kernel the config names;
- advantages by per-prompt statistics (``PerPromptStatTracker``): A = (r - mean_p) / (std_p + 1e-6) with the
  prompt's mean and std when it has at least ``min_count`` rewards, the batch's otherwise; clipped to +-adv_clip;
- the loss of each replayed step is the PPO-clipped importance-sampling objective
  L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(log p_theta - log p_old) (``clipped_policy_loss``),
  on all stochastic steps or a random fraction of them (``timestep_fraction``, redrawn every iteration); no KL.

Per-prompt statistics in the trainer: the protocol hands ``advantages_and_stats`` the gathered rewards, the
iteration's group ids (one group = one prompt, kept whole across processes) and each sample's prompt text. By
default the tracker keys on the group (this iteration's rewards); with ``buffer_size > 0`` it keys on the prompt
text and keeps each prompt's last ``buffer_size`` rewards across iterations, as ddpo-pytorch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flowalign import seeding
from flowalign.rollout import replay_step

from .base import Algorithm, RolloutSpec, Work
from .grpo import clipped_policy_loss


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward statistics: each key's last ``buffer_size`` rewards (0: only the current
    call's); a key with fewer than ``min_count`` of them is normalised by the whole call's mean and std."""

    def __init__(self, buffer_size: int = 0, min_count: int = 2, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict = {}

    def update(self, keys, rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu()
        keys = [k.item() if isinstance(k, torch.Tensor) else k for k in keys]
        adv = torch.empty_like(r)
        bmean, bstd = r.mean(), r.std(unbiased=False)
        for k in dict.fromkeys(keys):
            m = torch.tensor([kk == k for kk in keys])
            if self.buffer_size > 0:
                buf = self.buffers.setdefault(k, deque(maxlen=self.buffer_size))
                buf.extend(r[m].tolist())
                hist = torch.tensor(list(buf), dtype=torch.float64)
            else:
                hist = r[m]
            if len(hist) < self.min_count:
                mean, std = bmean, bstd
            else:
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[m] = (r[m] - mean) / (std + self.eps)
        return adv.to(rewards.device, torch.float32)

    def clear(self) -> None:
        self.buffers.clear()


def ddpo_step_loss(log_prob, old_log_prob, adv, clip_range: float, adv_clip: float):
    """One replayed step: the clipped importance-sampling loss with advantages clipped to +-adv_clip."""
    loss, stats = clipped_policy_loss(log_prob, old_log_prob, adv.clamp(-adv_clip, adv_clip), clip_range)
    stats["policy_loss"] = loss.item()
    return loss, stats


@dataclass
class DDPOConfig:
    name: Literal["ddpo"] = "ddpo"
    clip_range: float = 1e-4            # PPO clip on the per-step likelihood ratio (ddpo-pytorch)
    adv_clip: float = 5.0
    min_count: int = 2                  # rewards a prompt needs for its own statistics; fewer: the batch's
    buffer_size: int = 0                # > 0: each prompt's statistics over its last N rewards, across iterations
    timestep_fraction: float = 1.0      # random fraction of the stochastic steps trained each iteration

    def validate(self, err) -> None:
        if not self.clip_range > 0:
            err("algorithm.clip_range", f"must be > 0, got {self.clip_range}")
        if not self.adv_clip > 0:
            err("algorithm.adv_clip", f"must be > 0, got {self.adv_clip}")
        if self.min_count < 1:
            err("algorithm.min_count", f"must be >= 1, got {self.min_count}")
        if self.buffer_size < 0:
            err("algorithm.buffer_size", f"must be >= 0, got {self.buffer_size}")
        if not 0 < self.timestep_fraction <= 1:
            err("algorithm.timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")


class DDPO(Algorithm):
    name = "ddpo"
    Config = DDPOConfig
    stochastic = True

    def __init__(self, cfg: DDPOConfig, ctx):
        super().__init__(cfg, ctx)
        self.step_pool = ctx.sde_mask.nonzero().view(-1).tolist()
        if not self.step_pool:
            from flowalign.config import ConfigError

            raise ConfigError(f"sample.sde_steps: {ctx.sample.sde_steps!r} leaves no stochastic step; DDPO needs one")
        self.tracker = PerPromptStatTracker(buffer_size=cfg.buffer_size, min_count=cfg.min_count)

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic=True, branch_steps=list(self.step_pool))

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        # unclipped here: the loss clips (ddpo-pytorch); a group is one prompt's samples of this iteration
        return self.tracker.update(groups.tolist(), rewards).to(rewards.device)

    def advantages_and_stats(self, rewards, groups, keys=None):
        """With ``buffer_size > 0`` the statistics are per prompt text (``keys``, gathered by the trainer) over the
        prompt's last ``buffer_size`` rewards across iterations, as ddpo-pytorch; otherwise per group."""
        if self.cfg.buffer_size > 0 and keys is not None:
            return self.tracker.update(list(keys), rewards).to(rewards.device), {
                "tracked_prompts": float(len(self.tracker.buffers))}
        return self.advantages(rewards, groups), {}

    def plan(self, traj, adv, it, gen) -> Work:
        rng = seeding.rng(self.ctx.seed, "ddpo/steps", it)
        k = max(1, round(self.cfg.timestep_fraction * len(self.step_pool)))
        steps = sorted(rng.sample(self.step_pool, k)) if traj.sde_mask.ndim == 1 else list(self.step_pool)
        return Work(traj, adv, torch.arange(len(traj)), info={"steps": steps})

    def parts(self, work: Work) -> list:
        return list(work.info["steps"])

    def loss(self, fwd, work: Work, j: int):
        sub, a = work.traj, work.adv
        scale = 1.0 / len(work.info["steps"])
        if sub.sde_mask.ndim == 2:  # per-sample stochastic steps (branching): the rows stochastic at j
            rows = sub.sde_mask[:, j].nonzero().view(-1)
            scale *= len(rows) / len(sub)
            rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)
            sub, a = sub.index(rows), a[rows.to(a.device)]
        out = replay_step(fwd, sub, j, kernel=self.ctx.sample.kernel)
        loss, stats = ddpo_step_loss(out.log_prob, sub.log_probs[:, j], a, self.cfg.clip_range, self.cfg.adv_clip)
        stats["adv_abs"] = float(np.abs(a.detach().cpu().numpy()).mean())
        return loss * scale, stats
