"""``shapeworld``: the exact ShapeWorld judge as a reward: GenEval partial credit (``partial``), 0/1 correctness
(``binary``), or partial credit whose position term is a continuous ramp across the judge's boundary (``dense``:
pushing an object further the right way pays before the verdict flips). ``strict=True`` judges with the training
judge's strict verdict (``geneval.judge(strict=True)``: only unambiguous objects count), so a config can reward
clean, unambiguous objects: ``rewards: {shapeworld: {weight: 1.0, strict: true}}``. Either way this is the
*training* judge; the held-out judge (``shapeworld.geometry_judge``) is never a reward.

``version`` selects the training judge's detector: 1 (default) ``shapeworld.detector``, every number before it;
2 ``shapeworld.detector_v2``, the same palette labelling and template IoU without colour fragmentation (a shape
drawn between two palette colours is one object): ``rewards: {shapeworld: {weight: 1.0, version: 2}}``."""
from __future__ import annotations

import torch
from flowalign.eval.geneval import judge

from flowalign.shapeworld import detector, detector_v2

from .base import Reward, register, to_uint8

VERSIONS = {1: detector.detect, 2: detector_v2.detect}


class ShapeWorldReward(Reward):
    name = "shapeworld"
    needs_metadata = True

    def __init__(self, mode: str = "partial", device="cpu", batch_size: int = 256, position_ramp: float = 0.1,
                 strict: bool = False, version: int = 1):
        super().__init__(device=device, batch_size=batch_size)
        if isinstance(version, bool) or version not in VERSIONS:
            raise ValueError(f"shapeworld reward version must be one of {', '.join(map(str, VERSIONS))}, "
                             f"got {version!r}")
        self.version, self.detect = version, VERSIONS[version]
        if not isinstance(strict, bool):
            raise ValueError(f"shapeworld reward strict must be true or false, got {strict!r}")
        if mode not in ("partial", "binary", "dense"):
            raise ValueError(f"shapeworld reward mode must be 'partial', 'binary' or 'dense', got {mode!r}")
        if not position_ramp > 0:
            raise ValueError(f"shapeworld reward position_ramp must be > 0, got {position_ramp}")
        self.mode, self.ramp, self.strict = mode, position_ramp, strict

    def score(self, images, prompts, metadata):
        dets = [self.detect(im) for im in to_uint8(images)]
        verdicts = [judge(m, d, strict=self.strict) for m, d in zip(metadata, dets)]
        correct = torch.tensor([float(c) for c, _ in verdicts])
        partial = torch.tensor([p for _, p in verdicts])
        out = {"correct": correct, "partial": partial}
        if self.mode == "dense":
            out["dense"] = torch.tensor([judge(m, d, self.ramp, strict=self.strict)[1] for m, d in zip(metadata, dets)])
        out["reward"] = {"partial": partial, "binary": correct}.get(self.mode, out.get("dense"))
        return out


@register("shapeworld")
def _build(mode: str = "partial", device: str = "cpu", batch_size: int = 256,
           position_ramp: float = 0.1, strict: bool = False, version: int = 1) -> ShapeWorldReward:
    return ShapeWorldReward(mode=mode, device=device, batch_size=batch_size, position_ramp=position_ramp,
                            strict=strict, version=version)
