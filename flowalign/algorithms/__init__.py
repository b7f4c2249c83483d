"""Algorithms: given trajectories and rewards, prepare targets and return per-step losses."""
from .grpo import GRPO, clipped_policy_loss, group_advantages

ALGORITHMS = {"grpo": GRPO}

__all__ = ["ALGORITHMS", "GRPO", "clipped_policy_loss", "group_advantages"]
