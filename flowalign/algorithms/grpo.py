"""Flow-GRPO: group-normalised advantages and the PPO-clipped per-step policy loss (plus KL, added by the trainer).

- ``group_advantages``: A_i = (r_i - mean_g) / (std_g + eps), std over the prompt's group (population std) or, with
  ``global_std``, over the whole batch; groups whose rewards are all equal get A = 0; then clipped to +-adv_clip.
- ``clipped_policy_loss``: per stored step, r = exp(log p_theta - log p_old) and
  L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass
class GRPO:
    """What the trainer needs to know: stored log-probs (yes), a reference model (when beta > 0), whole groups."""
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    global_std: bool = False
    beta: float = 0.0
    needs_log_probs: bool = True
    needs_groups: bool = True

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards, group_ids, self.global_std, adv_clip=self.adv_clip)

    def step_loss(self, log_prob, old_log_prob, adv, kl: torch.Tensor | None = None):
        loss, stats = clipped_policy_loss(log_prob, old_log_prob, adv, self.clip_range)
        stats["policy_loss"] = loss.item()
        if kl is not None and self.beta > 0:
            loss = loss + self.beta * kl.mean()
            stats["kl"] = kl.mean().item()
        return loss, stats
