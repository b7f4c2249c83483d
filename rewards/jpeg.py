"""``jpeg_compressibility`` / ``jpeg_incompressibility``: the DDPO toy rewards, as flow_grpo computes them.

Each image is quantised to uint8 and saved as JPEG at quality 95; its size in kB (1000 bytes) gives
``jpeg_compressibility = -size/500`` (smaller files score higher: flat, simple images) and
``jpeg_incompressibility = +size/500`` (detail and noise score higher). The size is also returned as
``"size_kb"``. No weights, not differentiable; the prompt is ignored.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

from .base import Reward, register, to_uint8

QUALITY = 95
SCALE = 500.0


def jpeg_size_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """JPEG file sizes in kB of (B,3,H,W) images in [0, 1]."""
    sizes = []
    for a in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes)


class JpegReward(Reward):
    differentiable = False

    def __init__(self, sign: float, name: str, quality: int = QUALITY, device="cpu", batch_size: int = 256):
        super().__init__(device=device, batch_size=batch_size)
        self.sign, self.name, self.quality = sign, name, quality

    def score(self, images, prompts, metadata):
        kb = jpeg_size_kb(images, self.quality)
        return {"reward": self.sign * kb / SCALE, "size_kb": kb}


@register("jpeg_compressibility")
def _compressibility(quality: int = QUALITY, device: str = "cpu", batch_size: int = 256) -> JpegReward:
    return JpegReward(-1.0, "jpeg_compressibility", quality, device, batch_size)


@register("jpeg_incompressibility")
def _incompressibility(quality: int = QUALITY, device: str = "cpu", batch_size: int = 256) -> JpegReward:
    return JpegReward(1.0, "jpeg_incompressibility", quality, device, batch_size)
