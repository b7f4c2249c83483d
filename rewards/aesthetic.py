"""``aesthetic``: the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

CLIP ViT-L/14 image embedding (``openai/clip-vit-large-patch14``, L2-normalised) -> linear stack
768-1024-128-64-16-1 (no activations; ``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.0.weight`` ...).
The score is a 1-10 aesthetic rating (typical photos 4-6.5). The prompt is ignored. Differentiable.

``path`` is the head file: a local ``.pth``, a directory holding ``sac+logos+ava1-l14-linearMSE.pth`` (or
``aesthetic-model.pth``), or ``owner/repo:filename`` on the hub (default: TRL's mirror of the same weights).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._common import (ImagePreprocess, freeze, from_pretrained, load_clip_image_processor, load_linear_stack_head,
                      load_state_dict, quiet_transformers, resolve_file)
from .base import Reward, register

HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"


class AestheticReward(Reward):
    name = "aesthetic"
    differentiable = True

    def __init__(self, path: str = DEFAULT_HEAD, clip: str = "openai/clip-vit-large-patch14",
                 processor: str | None = None, device="cpu", dtype=torch.float32, batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        local = os.path.expanduser(str(path))
        if os.path.isdir(local):
            found = [f for f in HEAD_FILES if os.path.isfile(os.path.join(local, f))]
            path = os.path.join(local, found[0]) if found else local  # resolve_file names the directory
        path = resolve_file(path, "aesthetic head", HEAD_FILES[0])
        sd = load_state_dict(path, "aesthetic head")  # the cheap checks first
        from transformers import CLIPConfig, CLIPVisionModelWithProjection
        # only the image tower of the CLIPModel checkpoint (its text tower would be dead weight); the vision
        # config needs the top-level projection size, which not every saved config repeats in it
        cfg = from_pretrained(CLIPConfig, clip, "aesthetic CLIP config")
        vcfg = cfg.vision_config
        vcfg.projection_dim = cfg.projection_dim
        with quiet_transformers():  # the text-tower keys it skips are expected
            model = from_pretrained(CLIPVisionModelWithProjection, clip, "aesthetic CLIP model", config=vcfg)
        self.model = freeze(model, self.device, self.dtype)
        self.preprocess = ImagePreprocess.from_image_processor(
            load_clip_image_processor(processor or clip, "aesthetic image processor"))
        self.size = self.preprocess.out_size
        head = load_linear_stack_head(sd, "layers.", "aesthetic head", path, model.config.projection_dim)
        self.head = freeze(head, self.device, torch.float32)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        px = self.preprocess(images.to(self.device)).to(self.dtype)
        return F.normalize(self.model(pixel_values=px).image_embeds.float(), dim=-1)

    def score(self, images, prompts, metadata):
        return {"reward": self.head(self.embed(images)).squeeze(-1)}


@register("aesthetic")
def _build(path: str = DEFAULT_HEAD, clip: str = "openai/clip-vit-large-patch14", processor: str | None = None,
           device: str = "cpu", dtype="float32", batch_size: int = 32) -> AestheticReward:
    return AestheticReward(clip=clip, path=path, processor=processor, device=device, dtype=dtype,
                           batch_size=batch_size)
