"""A transformers ``CLIPModel`` with its tokenizer and differentiable preprocessing: the core of clipscore,
pickscore and hpsv2 (and the colour classifier of geneval)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (ImagePreprocess, freeze, from_pretrained, load_clip_image_processor, load_tokenizer,
                      unique_index)


class CLIPScorer:
    """Embeds images (B,3,H,W in [0,1], differentiably) and prompts with a CLIP model; features are
    L2-normalised float32."""

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, device, dtype):
        self.model = freeze(model, device, dtype)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device, self.dtype = torch.device(device), dtype
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, path, processor=None, *, what: str, device="cpu", dtype=torch.float32) -> CLIPScorer:
        """``path``: a CLIPModel directory or hub id; ``processor``: where the tokenizer and
        ``preprocessor_config.json`` live (default: ``path``)."""
        from transformers import CLIPModel
        model = from_pretrained(CLIPModel, path, f"{what} model")
        src = processor if processor is not None else path
        tok = load_tokenizer(src, f"{what} tokenizer")
        pre = ImagePreprocess.from_image_processor(load_clip_image_processor(src, f"{what} image processor"))
        return cls(model, tok, pre, device, dtype)

    @property
    def size(self) -> int | None:
        return self.preprocess.out_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocess(images.to(self.device)).to(self.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features_from_pixels(self.pixel_values(images))

    def image_features_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """One row per prompt; repeated prompts (a GRPO group) are embedded once."""
        uniq, idx = unique_index(prompts)
        with torch.no_grad():  # the text side never needs gradients
            pooled = self.model.text_model(**self.tokenize(uniq)).pooler_output
            feats = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
        return feats[idx.to(feats.device)]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)
