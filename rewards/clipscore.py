"""``clipscore``: text-image agreement of a CLIP model (transformers ``CLIPModel``), differentiable.

``mode`` picks the convention of the score:
- ``"cosine"`` (default): cos(image embedding, text embedding), in [-1, 1] (typically 0.15-0.40);
- ``"clipscore"``: Hessel et al. 2021, ``2.5 * max(cos, 0)`` (w = 2.5);
- ``"x100"``: torchmetrics' ``100 * max(cos, 0)``.
The clamped modes have zero gradient where cos < 0. The raw cosine is always returned as ``"cosine"``.
"""
from __future__ import annotations

import torch

from ._clip import CLIPScorer
from .base import Reward, RewardError, register

MODES = {"cosine": (1.0, False), "clipscore": (2.5, True), "x100": (100.0, True)}


class ClipScoreReward(Reward):
    name = "clipscore"
    differentiable = True

    def __init__(self, path: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 mode: str = "cosine", device="cpu", dtype=torch.float32, batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if mode not in MODES:
            raise RewardError(f"clipscore mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.clip = CLIPScorer.load(path, processor, what="clipscore", device=self.device, dtype=self.dtype)
        self.size = self.clip.size

    def score(self, images, prompts, metadata):
        cos = self.clip.cosine(images, prompts)
        w, clamp = MODES[self.mode]
        return {"reward": w * (cos.clamp(min=0) if clamp else cos), "cosine": cos}


@register("clipscore")
def _build(path: str = "openai/clip-vit-large-patch14", processor: str | None = None, mode: str = "cosine",
           device: str = "cpu", dtype="float32", batch_size: int = 32) -> ClipScoreReward:
    return ClipScoreReward(path=path, processor=processor, mode=mode, device=device, dtype=dtype,
                           batch_size=batch_size)
