"""``shapeclip``: a tiny CLIP trained on ShapeWorld renders, as a differentiable prompt-alignment reward.

A learned proxy for the exact judge (``shapeworld``): good on renders (see ``assets/shapeclip/
training_report.json`` for its held-out retrieval accuracy) but, being a small network, hackable, which is what
the reward-hacking experiment (``configs/shapeworld_hack_shapeclip*.yaml``) measures.

- weights: a ``transformers.CLIPModel`` directory (``save_pretrained`` + ``CLIPTokenizer`` files +
  ``preprocessor_config.json``); default the shipped ``rewards/assets/shapeclip``, ``path=`` loads another;
  train one with ``python -m flowalign.shapeworld.shapeclip_train --out DIR``;
- preprocessing in torch: bilinear (antialiased) resize to 32 px when needed, then ``(x - mean) / std``;
- ``reward`` = ``logit_scale * cos(image, text)`` (``scaled=False``: the cosine); ``cosine`` is always reported;
- differentiable: gradients flow to the input images; text embeddings are cached per prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward, RewardError, register

DEFAULT_PATH = Path(__file__).parent / "assets" / "shapeclip"
TRAIN_HINT = "python -m flowalign.shapeworld.shapeclip_train --out"


class ShapeClipReward(Reward):
    name = "shapeclip"
    differentiable = True
    size = 32

    def __init__(self, path=None, scaled: bool = True, device="cpu", dtype="float32", batch_size: int = 256):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import CLIPModel, CLIPTokenizer

        d = Path(path).expanduser() if path is not None else DEFAULT_PATH
        if not d.is_dir():
            raise RewardError(f"shapeclip: weight directory not found: {d} (train one with `{TRAIN_HINT} {d}`)")
        if not (d / "config.json").is_file():
            raise RewardError(f"shapeclip: no config.json in {d}: not a CLIPModel directory (train one with "
                              f"`{TRAIN_HINT} {d}`)")
        from transformers.utils import logging as hf_logging

        bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()  # a 200k-parameter model needs no loading bar
        hf_logging.set_verbosity_error()
        try:
            self.model = CLIPModel.from_pretrained(str(d)).to(self.device, self.dtype).eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(d))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardError(f"shapeclip: could not load a CLIPModel from {d}: {first[:300]}") from None
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
        pp = d / "preprocessor_config.json"
        cfg = json.loads(pp.read_text()) if pp.is_file() else {}
        kw = dict(dtype=self.dtype, device=self.device)
        self.mean = torch.tensor(cfg.get("image_mean", [0.5] * 3), **kw).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", [0.5] * 3), **kw).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.scaled = scaled
        self.path = d
        self._text_cache: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------- embeddings
    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device)).pooler_output
            emb = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def score(self, images, prompts, metadata):
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        scale = self.model.logit_scale.exp().float().clamp(max=100)
        return {"reward": scale * cos if self.scaled else cos, "cosine": cos}


@register("shapeclip")
def _build(path=None, scaled: bool = True, device: str = "cpu", dtype: str = "float32",
           batch_size: int = 256) -> ShapeClipReward:
    return ShapeClipReward(path=path, scaled=scaled, device=device, dtype=dtype, batch_size=batch_size)
