"""flowalign.rewards: one reward interface for training, noise optimisation and evaluation."""
from .base import REGISTRY, Reward, RewardError, build_reward, known_rewards, register, to_tensor, to_uint8

__all__ = ["REGISTRY", "Reward", "RewardError", "build_reward", "known_rewards", "register", "to_tensor", "to_uint8"]
