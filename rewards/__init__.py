"""flowalign.rewards: one reward interface for training, noise optimisation and evaluation."""
from .base import REGISTRY, Reward, RewardError, build_reward, known_rewards, register, to_tensor, to_uint8
from .combine import BradleyTerryJudge, Ensemble, Pairwise, PairwiseJudge, RunningStats, WeightedSum, build_rewards

__all__ = ["REGISTRY", "Reward", "RewardError", "build_reward", "build_rewards", "known_rewards", "register",
           "to_tensor", "to_uint8", "BradleyTerryJudge", "Ensemble", "Pairwise", "PairwiseJudge", "RunningStats",
           "WeightedSum"]
