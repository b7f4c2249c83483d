"""Algorithms, one file each, on the protocol of ``base.py``: ``ALGORITHMS[name]`` is the class, ``Class.Config``
its YAML section (``algorithm: {name: ..., ...}``)."""
from .awm import AWM
from .base import Algorithm, Context, Forward, RolloutSpec, Work
from .ddpo import DDPO
from .grpo import GRPO, clipped_policy_loss, group_advantages
from .dragon import Dragon
from .nft import NFT
from .prdp import PRDP
from .pref_grpo import PrefGRPO

ALGORITHMS = {cls.name: cls for cls in (GRPO, NFT, AWM, PrefGRPO, PRDP, Dragon, DDPO)}

__all__ = ["ALGORITHMS", "AWM", "Algorithm", "Context", "Dragon", "Forward", "GRPO", "NFT", "PRDP", "PrefGRPO",
           "RolloutSpec", "Work",
           "clipped_policy_loss", "group_advantages"]
