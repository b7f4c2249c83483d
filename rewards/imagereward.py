"""``imagereward``: ImageReward-v1.0 (Xu et al. 2023) with our own loader (the ``image-reward`` pip package is
not used: it pins old transformers/timm). Differentiable.

The model is BLIP: a ViT-L/16 image encoder (timm layout, ``blip.visual_encoder.*``) and a BERT-base text
encoder whose layers cross-attend to the image tokens (BLIP ``med.py`` layout, ``blip.text_encoder.*``),
then an MLP head on the [CLS] feature (``mlp.layers.{0,2,4,6,7}``: 768-1024-128-64-16-1, no activations),
normalised as ``(head - 0.16717362830052426) / 1.0333394966054072``. The checkpoint keys are mapped onto
transformers ``BlipVisionModel`` + ``BlipTextModel`` (cross-attention layers on, bidirectional self-attention).

Files: the hub repo ``THUDM/ImageReward`` holds ``ImageReward.pt`` (a plain state dict) and ``med_config.json``
(the BERT config); the tokenizer is ``bert-base-uncased`` (+ BLIP's ``[DEC]``/``[ENC]`` special tokens).
``path`` may be that hub id, a local directory with the same two files, or the ``.pt`` file itself. Prompts are
tokenised like ImageReward: padded/truncated to 35 tokens. Images: shortest side to 224 (bicubic), center crop,
OpenAI CLIP mean/std. Scores are roughly standard normal over generated images (higher = preferred).
"""
from __future__ import annotations

import json
import os
import re

import torch

from ._common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess, empty_init, first_line, freeze, load_into,
                      load_linear_stack_head, load_state_dict, load_tokenizer, require_keys, resolve_file)
from .base import Reward, RewardError, register

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CKPT, MED_CONFIG = "ImageReward.pt", "med_config.json"
HUB_REPO = "THUDM/ImageReward"
VIS, TXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
# BLIP's med_config.json for ImageReward (BERT-base with cross-attention); used when no file is found
DEFAULT_MED_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                      "max_position_embeddings": 512, "vocab_size": 30524, "pad_token_id": 0}
_VIS_BLOCK = [("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
              ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]


def _depth(sd, pattern) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def vision_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blip.visual_encoder.*`` (timm ViT) -> ``BlipVisionModel`` keys."""
    out = {"embeddings.class_embedding": sd[VIS + "cls_token"],
           "embeddings.position_embedding": sd[VIS + "pos_embed"],
           "embeddings.patch_embedding.weight": sd[VIS + "patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": sd[VIS + "patch_embed.proj.bias"],
           "post_layernorm.weight": sd[VIS + "norm.weight"], "post_layernorm.bias": sd[VIS + "norm.bias"]}
    for i in range(_depth(sd, re.escape(VIS) + r"blocks\.(\d+)\.")):
        for a, h in _VIS_BLOCK:
            for p in ("weight", "bias"):
                out[f"encoder.layers.{i}.{h}.{p}"] = sd[f"{VIS}blocks.{i}.{a}.{p}"]
    return out


def text_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blip.text_encoder.*`` (BLIP med.py BertModel) -> ``BlipTextModel`` keys (the same names)."""
    return {k[len(TXT):]: v for k, v in sd.items()
            if k.startswith(TXT) and not k.endswith("position_ids") and not k.startswith(TXT + "pooler.")}


def blip_configs(sd: dict[str, torch.Tensor], med: dict, vision_heads: int | None = None):
    """(BlipVisionConfig, BlipTextConfig) from the checkpoint shapes + med_config (heads, eps, activation)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    d = sd[VIS + "cls_token"].shape[-1]
    patch = sd[VIS + "patch_embed.proj.weight"].shape[-1]
    grid = int(round((sd[VIS + "pos_embed"].shape[1] - 1) ** 0.5))
    heads = vision_heads or d // 64
    if not heads or d % heads:
        raise RewardError(f"imagereward: vision width {d} does not split into {heads} heads (set vision_heads)")
    vision = BlipVisionConfig(hidden_size=d, intermediate_size=sd[VIS + "blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=_depth(sd, re.escape(VIS) + r"blocks\.(\d+)\."),
                              num_attention_heads=heads, image_size=patch * grid, patch_size=patch,
                              hidden_act="gelu", layer_norm_eps=1e-6)
    vocab, hidden = sd[TXT + "embeddings.word_embeddings.weight"].shape
    if hidden != med.get("hidden_size", hidden):
        raise RewardError(f"imagereward: med_config hidden_size {med['hidden_size']} does not match the "
                          f"checkpoint's {hidden}")
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=d,
                          intermediate_size=sd[TXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=_depth(sd, re.escape(TXT) + r"encoder\.layer\.(\d+)\."),
                          num_attention_heads=med.get("num_attention_heads", 12),
                          max_position_embeddings=sd[TXT + "embeddings.position_embeddings.weight"].shape[0],
                          hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                          pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None,
                          sep_token_id=None, is_decoder=True,  # is_decoder: build the cross-attention layers
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision, text


def _find_files(path, med_config):
    """(checkpoint file, med_config file or None)."""
    local = os.path.expanduser(str(path))
    ckpt = resolve_file(path, "imagereward checkpoint", CKPT)
    if med_config is not None:
        return ckpt, resolve_file(med_config, "imagereward med_config", MED_CONFIG)
    sibling = os.path.join(os.path.dirname(ckpt), MED_CONFIG)
    if os.path.isfile(sibling):
        return ckpt, sibling
    if not os.path.exists(local):  # hub: the repo has med_config.json next to the checkpoint
        repo = str(path).partition(":")[0]
        try:
            return ckpt, resolve_file(f"{repo}:{MED_CONFIG}", "imagereward med_config")
        except RewardError:
            pass
    return ckpt, None


class ImageRewardReward(Reward):
    name = "imagereward"
    differentiable = True

    def __init__(self, path: str = HUB_REPO, tokenizer: str = "bert-base-uncased", med_config: str | None = None,
                 vision_heads: int | None = None, max_length: int = 35, device="cpu", dtype=torch.float32,
                 batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import BlipTextModel, BlipVisionModel
        ckpt, med_file = _find_files(path, med_config)
        med = dict(DEFAULT_MED_CONFIG)
        if med_file:
            try:
                med.update(json.loads(open(med_file).read()))
            except (OSError, ValueError) as e:
                raise RewardError(f"imagereward: cannot read med_config {med_file}: {first_line(e)}") from None
        sd = load_state_dict(ckpt, "imagereward checkpoint")
        require_keys(sd, [VIS + "cls_token", VIS + "pos_embed", VIS + "patch_embed.proj.weight", VIS + "norm.weight",
                          TXT + "embeddings.word_embeddings.weight", HEAD + "0.weight"], "imagereward", ckpt)
        vcfg, tcfg = blip_configs(sd, med, vision_heads)
        with empty_init():
            vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
        self.vision = load_into(vision, vision_to_hf(sd), "imagereward", ckpt)
        self.text = load_into(text, text_to_hf(sd), "imagereward", ckpt)
        self.vision = freeze(self.vision, self.device, self.dtype)
        self.text = freeze(self.text, self.device, self.dtype)
        self.head = freeze(load_linear_stack_head(sd, HEAD, "imagereward head", ckpt, tcfg.hidden_size),
                           self.device, torch.float32)
        self.tokenizer = load_tokenizer(tokenizer, "imagereward tokenizer")
        # BLIP's init_tokenizer adds these; they do not change how prompts tokenise, only the vocabulary size
        if "[DEC]" not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) > tcfg.vocab_size:
            raise RewardError(f"imagereward: tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens but the "
                              f"checkpoint's text encoder only {tcfg.vocab_size}")
        self.max_length = min(max_length, tcfg.max_position_embeddings)
        n = vcfg.image_size
        self.preprocess = ImagePreprocess(n, (n, n), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
        self.size = n

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def score_pixels(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Raw model on preprocessed pixels: normalised ImageReward scores (B,)."""
        img = self.vision(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        tok = self.tokenize(prompts)
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        out = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=img,
                        encoder_attention_mask=img_mask, is_decoder=False).last_hidden_state
        return ((self.head(out[:, 0].float()) - MEAN) / STD).squeeze(-1)

    def score(self, images, prompts, metadata):
        return {"reward": self.score_pixels(self.preprocess(images.to(self.device)), prompts)}


@register("imagereward")
def _build(path: str = HUB_REPO, tokenizer: str = "bert-base-uncased", med_config: str | None = None,
           vision_heads: int | None = None, max_length: int = 35, device: str = "cpu", dtype="float32",
           batch_size: int = 32) -> ImageRewardReward:
    return ImageRewardReward(path=path, tokenizer=tokenizer, med_config=med_config, vision_heads=vision_heads,
                             max_length=max_length, device=device, dtype=dtype, batch_size=batch_size)
