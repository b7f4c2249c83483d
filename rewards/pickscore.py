"""``pickscore``: PickScore (Kirstain et al. 2023), a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Weights: ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel``); tokenizer and image preprocessing from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as in the PickScore reference code). Both may be local directories;
with ``processor="auto"`` (default) a local model directory that holds a ``preprocessor_config.json`` serves as
its own processor, anything else uses the LAION processor.
Score = ``logit_scale.exp() * cos(image, text)`` (about 18-24 for real images). ``scale="flow_grpo"`` divides
by 26 as flow_grpo does (about 0.7-0.9); ``scale="cosine"`` returns the bare cosine. Differentiable.
"""
from __future__ import annotations

import os

import torch

from ._clip import CLIPScorer
from .base import Reward, RewardError, register

SCALES = ("logit", "flow_grpo", "cosine")
FLOW_GRPO_DIVISOR = 26.0
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _auto_processor(path, processor):
    if processor != "auto":
        return processor
    local = os.path.expanduser(str(path))
    return local if os.path.isfile(os.path.join(local, "preprocessor_config.json")) else PROCESSOR


class PickScoreReward(Reward):
    name = "pickscore"
    differentiable = True

    def __init__(self, path: str = "yuvalkirstain/PickScore_v1", processor: str | None = "auto",
                 scale: str = "logit", device="cpu", dtype=torch.float32, batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if scale not in SCALES:
            raise RewardError(f"pickscore scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.scale = scale
        self.clip = CLIPScorer.load(path, _auto_processor(path, processor), what="pickscore", device=self.device,
                                    dtype=self.dtype)
        self.size = self.clip.size

    @property
    def multiplier(self) -> float:
        if self.scale == "cosine":
            return 1.0
        s = self.clip.logit_scale
        return s / FLOW_GRPO_DIVISOR if self.scale == "flow_grpo" else s

    def score(self, images, prompts, metadata):
        cos = self.clip.cosine(images, prompts)
        return {"reward": self.multiplier * cos, "cosine": cos}


@register("pickscore")
def _build(path: str = "yuvalkirstain/PickScore_v1", processor: str | None = "auto", scale: str = "logit",
           device: str = "cpu", dtype="float32", batch_size: int = 32) -> PickScoreReward:
    return PickScoreReward(path=path, processor=processor, scale=scale, device=device, dtype=dtype,
                           batch_size=batch_size)
