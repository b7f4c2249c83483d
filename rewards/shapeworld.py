"""``shapeworld``: the exact ShapeWorld judge as a reward (GenEval partial credit or 0/1 correctness)."""
from __future__ import annotations

import torch

from flowalign.eval.geneval import judge
from flowalign.shapeworld.detector import detect

from .base import Reward, register, to_uint8


class ShapeWorldReward(Reward):
    name = "shapeworld"
    needs_metadata = True

    def __init__(self, mode: str = "partial", device="cpu", batch_size: int = 256):
        super().__init__(device=device, batch_size=batch_size)
        if mode not in ("partial", "binary"):
            raise ValueError(f"shapeworld reward mode must be 'partial' or 'binary', got {mode!r}")
        self.mode = mode

    def score(self, images, prompts, metadata):
        verdicts = [judge(m, detect(im)) for m, im in zip(metadata, to_uint8(images))]
        correct = torch.tensor([float(c) for c, _ in verdicts])
        partial = torch.tensor([p for _, p in verdicts])
        return {"reward": partial if self.mode == "partial" else correct, "correct": correct, "partial": partial}


@register("shapeworld")
def _build(mode: str = "partial", device: str = "cpu", batch_size: int = 256) -> ShapeWorldReward:
    return ShapeWorldReward(mode=mode, device=device, batch_size=batch_size)
