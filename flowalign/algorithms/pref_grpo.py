"""Pref-GRPO (Wang et al. 2025): GRPO whose reward is each image's win rate against the other members of its
prompt group, so that tiny score gaps do not become full-size advantages ("illusory advantages").

Within a group {x_1..x_G}, with a preference P(x_i > x_j):

    hard:  w_i = 1/(G-1) sum_{j != i} ( 1[P > 1/2] + 1/2 1[P = 1/2] )       (ties within ``tie_eps`` count 1/2)
    soft:  w_i = 1/(G-1) sum_{j != i} P(x_i > x_j),   P = sigmoid((s_i - s_j) / temperature)   (Bradley-Terry)
    given: the rewards already are win rates (a pairwise judge reward, ``rewards: {x: {pairwise: true}}``)

from the pointwise scores s of the configured reward; the win rates are then group-normalised as in GRPO and
trained with its clipped policy loss (everything else is ``grpo.GRPO``). The win rates are computed here, on the
rewards the trainer gathered from every process, keyed by group id: whole groups, and two groups of one prompt
stay apart. Logged beside them: the raw within-group reward std and the win rates' std (how spread the signal is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .grpo import GRPO, GRPOConfig, group_advantages


def group_win_rates(scores: torch.Tensor, groups: torch.Tensor, how: str = "hard", tie_eps: float = 0.0,
                    temperature: float = 0.05) -> torch.Tensor:
    """Each sample's mean preference over the other members of its group (0.5 for a group of one)."""
    s = scores.float()
    out = torch.full_like(s, 0.5)
    for g in torch.unique(groups):
        m = (groups == g).nonzero().view(-1)
        if len(m) < 2:
            continue
        d = s[m][:, None] - s[m][None, :]
        if how == "hard":
            p = (d > tie_eps).float() + 0.5 * (d.abs() <= tie_eps).float()
        else:
            p = torch.sigmoid(d / temperature)
        p.fill_diagonal_(0)
        out[m] = p.sum(1) / (len(m) - 1)
    return out


@dataclass
class PrefGRPOConfig(GRPOConfig):
    name: Literal["pref_grpo"] = "pref_grpo"
    preference: Literal["hard", "soft", "given"] = "hard"
    tie_eps: float = 0.0          # hard: score differences within this count as ties (1/2 each)
    temperature: float = 0.05     # soft: Bradley-Terry temperature, in the reward's units

    def validate(self, err) -> None:
        super().validate(err)
        if self.tie_eps < 0:
            err("algorithm.tie_eps", f"must be >= 0, got {self.tie_eps}")
        if not self.temperature > 0:
            err("algorithm.temperature", f"must be > 0, got {self.temperature}")
        if self.granularities:
            err("algorithm.granularities", "not supported with pref_grpo (win rates of one completion per sample)")


class PrefGRPO(GRPO):
    name = "pref_grpo"
    Config = PrefGRPOConfig

    def win_rates(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.preference == "given":
            return rewards.float()
        return group_win_rates(rewards, groups, c.preference, c.tie_eps, c.temperature)

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return group_advantages(self.win_rates(rewards, groups), groups, self.cfg.global_std,
                                adv_clip=self.cfg.adv_clip)

    def advantages_and_stats(self, rewards, groups, keys=None):
        w = self.win_rates(rewards, groups)
        adv = group_advantages(w, groups, self.cfg.global_std, adv_clip=self.cfg.adv_clip)
        raw = [float(rewards[groups == g].float().std(unbiased=False)) for g in torch.unique(groups)]
        return adv, {"win_rate_std": float(w.std(unbiased=False)), "raw_group_std": sum(raw) / len(raw)}
