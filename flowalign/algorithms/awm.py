"""AWM, advantage-weighted matching (Xue et al. 2025): the flow-matching loss on clean samples of ODE rollouts,
weighted by advantage through a PPO-clipped ratio.

Per sample and noise level t: l(theta) = w(t) mean((v_theta(x_t) - (eps - x_0))^2), the pseudo log-prob is -l, the
ratio exp(l_old - l_theta) against the policy at the start of the iteration ("old", snapshot after every
iteration) and L = mean(max(-A ratio, -A clip(ratio, 1 - eps_c, 1 + eps_c))) + beta mean((v_theta - v_ref)^2)
+ ema_beta mean((v_theta - v_ema)^2), with an EMA of the trained weights updated after every optimizer step.

Its authors and Flow-Factory warn: with both the clipping and the EMA-KL off, the negative-advantage samples push
the loss up without bound and training collapses; defaults are Flow-Factory's recommended ones (clip 1e-5,
ema_beta 0.1, ema decay 0.9).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .base import Algorithm, Work, nonzero_advantages
from .forward import check_time_cfg, plan_noising, velocity_draw, velocity_kl
from .grpo import clipped_policy_loss


def matching_loss(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                  weighting: str = "uniform") -> torch.Tensor:
    """Per-sample flow-matching loss w(t) mean((v - (eps - x0))^2), w = 1, t or t^2."""
    err = (v - (eps - x0)).pow(2).mean(tuple(range(1, x0.ndim)))
    w = {"uniform": torch.ones_like(t), "t": t, "t2": t * t}[weighting]
    return w.to(err) * err


@dataclass
class AWMConfig:
    name: Literal["awm"] = "awm"
    clip_range: float = 1e-5
    adv_clip: float = 5.0
    global_std: bool = False
    beta: float = 0.0                    # velocity-MSE KL to the frozen reference
    ema_beta: float = 0.1                # velocity-MSE KL to an EMA of the trained weights
    ema_decay: float = 0.9
    weighting: Literal["uniform", "t", "t2"] = "uniform"
    t_draws: int = 2
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    t_range: list = field(default_factory=lambda: [0.0, 1.0])

    def validate(self, err) -> None:
        if self.clip_range < 0:
            err("algorithm.clip_range", f"must be >= 0, got {self.clip_range}")
        if not self.adv_clip > 0:
            err("algorithm.adv_clip", f"must be > 0, got {self.adv_clip}")
        if self.beta < 0 or self.ema_beta < 0:
            err("algorithm.beta", f"beta and ema_beta must be >= 0, got {self.beta}, {self.ema_beta}")
        if not 0 <= self.ema_decay < 1:
            err("algorithm.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check_time_cfg(self, err)


class AWM(Algorithm):
    name = "awm"
    Config = AWMConfig
    stochastic = False

    def policies(self):
        return ("old",) + (("ema",) if self.cfg.ema_beta > 0 else ()) + (("reference",) if self.cfg.beta > 0 else ())

    def plan(self, traj, adv, it, gen) -> Work:
        c = self.cfg
        return plan_noising(traj, adv, nonzero_advantages(adv, self.ctx.world), c.t_draws, gen, c.t_sampling,
                            tuple(c.t_range))

    def parts(self, work: Work) -> list:
        return list(range(self.cfg.t_draws))

    def loss(self, fwd, work: Work, k: int):
        c = self.cfg
        x0, t, eps, x_t, v, v_old = velocity_draw(fwd, work, k)
        l_new = matching_loss(v, x0, eps, t, c.weighting)
        l_old = matching_loss(v_old, x0, eps, t, c.weighting)
        loss, stats = clipped_policy_loss(-l_new, -l_old, work.adv, c.clip_range) if c.clip_range > 0 else \
            ((work.adv * l_new).mean(), {})
        stats["policy_loss"] = loss.item()
        stats["match_loss"] = l_new.mean().item()
        for name, beta in (("reference", c.beta), ("ema", c.ema_beta)):
            if beta > 0:
                kl = velocity_kl(fwd, work, x_t, t, v, name)
                loss = loss + beta * kl
                stats["kl" if name == "reference" else "ema_kl"] = kl.item()
        return loss / c.t_draws, stats

    def after_step(self, adapter) -> None:
        if self.cfg.ema_beta > 0:
            adapter.lerp_policy("ema", 1 - self.cfg.ema_decay)

    def end_iteration(self, adapter, it: int) -> None:
        adapter.snapshot_policy("old")
