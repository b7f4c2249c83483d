"""Algorithms, one file each, on the protocol of ``base.py``: ``ALGORITHMS[name]`` is the class, ``Class.Config``
its YAML section (``algorithm: {name: ..., ...}``)."""
from .awm import AWM
from .base import Algorithm, Context, Forward, RolloutSpec, Work
from .grpo import GRPO, clipped_policy_loss, group_advantages
from .nft import NFT

ALGORITHMS = {cls.name: cls for cls in (GRPO, NFT, AWM)}

__all__ = ["ALGORITHMS", "AWM", "Algorithm", "Context", "Forward", "GRPO", "NFT", "RolloutSpec", "Work",
           "clipped_policy_loss", "group_advantages"]
