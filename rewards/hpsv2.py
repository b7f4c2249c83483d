"""``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023), differentiable.

The checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` in the hub repo ``xswu/HPSv2``) are
open_clip ViT-H-14 state dicts (under a ``"state_dict"`` key). By default we convert them into a transformers
``CLIPModel`` (``open_clip_to_hf``), so neither open_clip nor torchvision is needed; ``backend="open_clip"``
uses open_clip itself when it is installed. The score is HPS's: cos(image, text) (about 0.2-0.35).

Tokenizer: the OpenAI CLIP BPE (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` or a local copy), which is the
tokenizer open_clip uses for ViT-H-14 (open_clip additionally runs ftfy on the text). Image preprocessing is
open_clip's eval transform done in torch: shortest side to 224 (bicubic, antialiased), center crop, OpenAI
mean/std.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ._clip import CLIPScorer
from ._common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess, empty_init, freeze, load_into,
                      load_state_dict, load_tokenizer, resolve_file, unique_index)
from .base import Reward, RewardError, register

FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HUB_REPO = "xswu/HPSv2"
TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# open_clip vision head widths that are not 64 (ViT-H: 80, ViT-g: 88, ViT-bigG: 104), keyed by width
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_IGNORED = ("attn_mask", "logit_bias")

# per-block sub-keys: (open_clip, transformers) for tensors copied as they are
_BLOCK = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def _blocks(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise RewardError(f"open_clip checkpoint: non-contiguous blocks under {prefix}")
    return len(idx)


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip ``CLIP`` state dict (ViT image tower + text transformer) onto transformers
    ``CLIPModel`` keys. Raises RewardError on keys it cannot place (layer scale, attention pooling, HF/timm
    towers), so a silently half-loaded model cannot happen."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(k):
        if k not in sd:
            raise RewardError(f"open_clip checkpoint lacks {k!r} (not an open_clip ViT CLIP state dict?)")
        return sd.pop(k)

    for oc, hf in (("", "text_model."), ("visual.", "vision_model.")):
        n = _blocks(sd, f"{oc}transformer.resblocks.")
        for i in range(n):
            src, dst = f"{oc}transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}."
            w, b = take(src + "attn.in_proj_weight"), take(src + "attn.in_proj_bias")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{dst}self_attn.{name}.weight"] = w.chunk(3, 0)[j].clone()
                out[f"{dst}self_attn.{name}.bias"] = b.chunk(3, 0)[j].clone()
            for a, h in _BLOCK:
                for p in ("weight", "bias"):
                    out[f"{dst}{h}.{p}"] = take(f"{src}{a}.{p}")
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    for p in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{p}"] = take(f"ln_final.{p}")
        out[f"vision_model.pre_layrnorm.{p}"] = take(f"visual.ln_pre.{p}")
        out[f"vision_model.post_layernorm.{p}"] = take(f"visual.ln_post.{p}")
    tp = sd.pop("text_projection.weight", None)  # nn.Linear variant: already (out, in)
    out["text_projection.weight"] = tp if tp is not None else take("text_projection").t().contiguous()
    out["visual_projection.weight"] = take("visual.proj").t().contiguous()
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["logit_scale"] = take("logit_scale").reshape(())
    left = [k for k in sd if not k.endswith(_IGNORED)]
    if left:
        raise RewardError(f"open_clip checkpoint has {len(left)} key(s) this converter cannot map, e.g. {left[0]!r} "
                          "(layer scale / attention pooling / HF text tower are not supported; try backend='open_clip')")
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``open_clip_to_hf`` (transformers ``CLIPModel`` keys -> open_clip keys)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    for oc, hf in (("", "text_model."), ("visual.", "vision_model.")):
        for i in range(_blocks(sd, f"{hf}encoder.layers.")):
            src, dst = f"{hf}encoder.layers.{i}.", f"{oc}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{n}.{p}"]
                                                           for n in ("q_proj", "k_proj", "v_proj")])
                for a, h in _BLOCK:
                    out[f"{dst}{a}.{p}"] = sd[f"{src}{h}.{p}"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
        out[f"visual.ln_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


def open_clip_config(sd: dict[str, torch.Tensor], vision_head_width: int | None = None,
                     text_heads: int | None = None, act: str = "gelu"):
    """A transformers ``CLIPConfig`` for an open_clip ViT state dict, read from tensor shapes. Head counts are
    not in the shapes: open_clip's defaults (text: width/64; vision: width/64, ViT-H 80-wide heads) unless
    given. ``act``: "gelu" (open_clip default) or "quick_gelu" (OpenAI-trained weights)."""
    from transformers import CLIPConfig
    conv = sd["visual.conv1.weight"]
    vw, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    tw = sd["token_embedding.weight"].shape[1]
    tproj = sd["text_projection"] if "text_projection" in sd else sd["text_projection.weight"].t()
    hw = vision_head_width or _VISION_HEAD_WIDTH.get(vw, 64)
    th = text_heads or max(tw // 64, 1)
    if vw % hw or tw % th:
        raise RewardError(f"open_clip config: widths {vw}/{tw} do not split into heads of {hw} / {th} heads")
    vision = dict(hidden_size=vw, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_blocks(sd, "visual.transformer.resblocks."), num_attention_heads=vw // hw,
                  image_size=patch * grid, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5)
    text = dict(hidden_size=tw, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_blocks(sd, "transformer.resblocks."), num_attention_heads=th,
                vocab_size=sd["token_embedding.weight"].shape[0],
                max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=act, layer_norm_eps=1e-5,
                # eos_token_id 2 selects transformers' legacy pooling at argmax(input_ids), which is exactly
                # open_clip's (the EOT token has the highest id); the other special ids are unused
                eos_token_id=2, bos_token_id=None, pad_token_id=None)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=tproj.shape[1])


def clip_model_from_open_clip(sd: dict[str, torch.Tensor], **config_kw):
    """A transformers ``CLIPModel`` holding an open_clip state dict's weights."""
    from transformers import CLIPModel
    config = open_clip_config(sd, **config_kw)
    hf_sd = open_clip_to_hf(sd)
    with empty_init():  # skip the random init of ~1B parameters that are overwritten right away
        model = CLIPModel(config)
    load_into(model, hf_sd, "hpsv2 (open_clip -> CLIPModel)", "state dict")
    return model.eval()


class HPSv2Reward(Reward):
    name = "hpsv2"
    differentiable = True

    def __init__(self, path: str | None = None, version: str = "v2.1", tokenizer: str = TOKENIZER,
                 backend: str = "transformers", arch: str = "ViT-H-14", vision_head_width: int | None = None,
                 text_heads: int | None = None, device="cpu", dtype=torch.float32, batch_size: int = 32):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if version not in FILES:
            raise RewardError(f"hpsv2 version must be one of {', '.join(FILES)}, got {version!r}")
        if backend not in ("transformers", "open_clip"):
            raise RewardError(f"hpsv2 backend must be 'transformers' or 'open_clip', got {backend!r}")
        self.backend = backend
        ckpt = resolve_file(path or f"{HUB_REPO}:{FILES[version]}", "hpsv2 checkpoint", FILES[version])
        sd = load_state_dict(ckpt, "hpsv2 checkpoint")
        if backend == "open_clip":
            self._init_open_clip(sd, arch, ckpt)
            return
        if "visual.conv1.weight" not in sd:
            raise RewardError(f"hpsv2 checkpoint {ckpt} is not an open_clip ViT state dict (no visual.conv1.weight)")
        model = clip_model_from_open_clip(sd, vision_head_width=vision_head_width, text_heads=text_heads)
        n = model.config.vision_config.image_size
        pre = ImagePreprocess(n, (n, n), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
        self.clip = CLIPScorer(model, load_tokenizer(tokenizer, "hpsv2 tokenizer"), pre, self.device, self.dtype)
        self.size = n

    def _init_open_clip(self, sd, arch, ckpt):
        try:
            import open_clip
        except ImportError:
            raise RewardError("hpsv2 backend='open_clip' needs open_clip (pip install 'flowalign[openclip]'); "
                              "the default backend='transformers' does not") from None
        model = open_clip.create_model(arch, pretrained=None)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise RewardError(f"hpsv2: {ckpt} does not fit open_clip {arch}: {str(e).splitlines()[0]}") from None
        self.oc_model = freeze(model, self.device, self.dtype)
        self.oc_tokenizer = open_clip.get_tokenizer(arch)
        n = model.visual.image_size
        n = n[0] if isinstance(n, (tuple, list)) else n
        self.preprocess = ImagePreprocess(n, (n, n), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
        self.size = n

    def score(self, images, prompts, metadata):
        if self.backend == "transformers":
            return {"reward": self.clip.cosine(images, prompts)}
        px = self.preprocess(images.to(self.device)).to(self.dtype)
        img = F.normalize(self.oc_model.encode_image(px).float(), dim=-1)
        uniq, idx = unique_index(prompts)
        with torch.no_grad():
            txt = F.normalize(self.oc_model.encode_text(self.oc_tokenizer(uniq).to(self.device)).float(), dim=-1)
        return {"reward": (img * txt[idx.to(txt.device)]).sum(-1)}


@register("hpsv2")
def _build(path: str | None = None, version: str = "v2.1", tokenizer: str = TOKENIZER, backend: str = "transformers",
           arch: str = "ViT-H-14", vision_head_width: int | None = None, text_heads: int | None = None,
           device: str = "cpu", dtype="float32", batch_size: int = 32) -> HPSv2Reward:
    return HPSv2Reward(path=path, version=version, tokenizer=tokenizer, backend=backend, arch=arch,
                       vision_head_width=vision_head_width, text_heads=text_heads, device=device, dtype=dtype,
                       batch_size=batch_size)

