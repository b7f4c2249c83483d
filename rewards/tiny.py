"""Tiny randomly initialised replicas of the reward models, saved in the real checkpoints' on-disk formats.

They load through exactly the loaders a GPU user takes (``build_reward(name, path=<dir or file>)``), run on a
CPU in milliseconds and score garbage: they exist to test plumbing (key maps, preprocessing, batching,
gradients) without network or weights. Every builder takes a target directory and a seed and is
deterministic. Tokenizers are built offline: a byte-level BPE with a handful of merges (CLIP) and a small
WordPiece vocabulary (BERT).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------- tokenizers
BERT_WORDS = ("a an the of and photo picture image cat dog red green blue circle square triangle cross left right "
              "above below hello world sign text with on in one two three four").split()


def save_clip_tokenizer(directory) -> Path:
    """A CLIP BPE tokenizer (vocab.json + merges.txt, + tokenizer.json after a round trip): all 256 byte
    symbols, their end-of-word forms, a few merges, ``<|startoftext|>`` and ``<|endoftext|>`` (the highest id,
    as in CLIP)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "o f</w>", "p h", "o t", "ph ot", "phot o</w>", "h e", "l l", "ll o</w>"]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer.from_pretrained(d).save_pretrained(d)
    return d


def save_bert_tokenizer(directory, words=BERT_WORDS) -> Path:
    """An uncased BERT WordPiece tokenizer (vocab.txt) over letters, digits, ``##`` continuations and a few
    whole words."""
    from transformers import BertTokenizer
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + ".,!?'\"-:;") + ["##" + c for c in chars]
             + [w for w in dict.fromkeys(words) if len(w) > 1])
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(d).save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------------- CLIP
def tiny_clip_model(tokenizer, seed: int = 0, hidden_act: str = "quick_gelu", image_size: int = 32, patch: int = 8,
                    width: int = 32, heads: int = 2, layers: int = 2, projection_dim: int = 16,
                    max_positions: int = 32):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, hidden_act=hidden_act)
    cfg = CLIPConfig(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(common, image_size=image_size, patch_size=patch),
        projection_dim=projection_dim)
    return CLIPModel(cfg).eval()


def save_tiny_clip(directory, seed: int = 0, image_size: int = 32, **model_kw) -> Path:
    """A ``CLIPModel`` directory as on the hub: config.json + model.safetensors + tokenizer files +
    preprocessor_config.json (shortest edge = crop = ``image_size``, bicubic, OpenAI mean/std)."""
    from transformers import CLIPImageProcessor
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # noqa: F811
    except ImportError:
        pass
    d = Path(directory)
    tok = _load_tok(save_clip_tokenizer(d))
    tiny_clip_model(tok, seed=seed, image_size=image_size, **model_kw).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(d)
    return d


def _load_tok(d):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d)


def save_tiny_aesthetic_head(path, in_dim: int, seed: int = 0) -> Path:
    """The aesthetic MLP state dict (``layers.0.weight`` ... ``layers.7.bias``) as ``torch.save`` writes it."""
    from ._common import linear_stack_head
    torch.manual_seed(seed)
    head = linear_stack_head(in_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return path


def save_tiny_hpsv2(directory, seed: int = 0, version_file: str = "HPS_v2.1_compressed.pt"):
    """(checkpoint file, tokenizer dir, the tiny CLIPModel it came from): an open_clip-layout state dict under a
    ``"state_dict"`` key, made from a tiny GELU CLIPModel (vision width 64 in 2 heads of 32, text 2 heads) by
    ``hf_to_open_clip``. Load it with ``vision_head_width=32, text_heads=2``."""
    from .hpsv2 import hf_to_open_clip
    d = Path(directory)
    tok_dir = save_clip_tokenizer(d / "tokenizer")
    model = tiny_clip_model(_load_tok(tok_dir), seed=seed, hidden_act="gelu", width=64, heads=2)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": hf_to_open_clip(model.state_dict())}, d / version_file)
    return d / version_file, tok_dir, model


# ------------------------------------------------------------------------------------------ ImageReward
def imagereward_layout(vision_width=32, vision_depth=2, patch=8, image_size=32, text_width=32, text_depth=2,
                       vocab_size=100, max_positions=40, mlp_ratio=2) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ImageReward checkpoint (BLIP ViT + BERT with cross-attention + MLP head)."""
    V, T, P = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
    n = (image_size // patch) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        V + "cls_token": (1, 1, vision_width), V + "pos_embed": (1, n + 1, vision_width),
        V + "patch_embed.proj.weight": (vision_width, 3, patch, patch), V + "patch_embed.proj.bias": (vision_width,),
        V + "norm.weight": (vision_width,), V + "norm.bias": (vision_width,)}
    for i in range(vision_depth):
        b, h = f"{V}blocks.{i}.", mlp_ratio * vision_width
        for name, shape in (("norm1", (vision_width,)), ("norm2", (vision_width,)),
                            ("attn.qkv", (3 * vision_width, vision_width)), ("attn.proj", (vision_width, vision_width)),
                            ("mlp.fc1", (h, vision_width)), ("mlp.fc2", (vision_width, h))):
            shapes[b + name + ".weight"] = shape
            shapes[b + name + ".bias"] = (shape[0],)
    shapes.update({T + "embeddings.word_embeddings.weight": (vocab_size, text_width),
                   T + "embeddings.position_embeddings.weight": (max_positions, text_width),
                   T + "embeddings.LayerNorm.weight": (text_width,), T + "embeddings.LayerNorm.bias": (text_width,)})
    for i in range(text_depth):
        b, h = f"{T}encoder.layer.{i}.", mlp_ratio * text_width
        lin = {"attention.self.query": (text_width, text_width), "attention.self.key": (text_width, text_width),
               "attention.self.value": (text_width, text_width), "attention.output.dense": (text_width, text_width),
               "crossattention.self.query": (text_width, text_width),
               "crossattention.self.key": (text_width, vision_width),
               "crossattention.self.value": (text_width, vision_width),
               "crossattention.output.dense": (text_width, text_width),
               "intermediate.dense": (h, text_width), "output.dense": (text_width, h)}
        for name in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            lin[name] = (text_width,)
        for name, shape in lin.items():
            shapes[b + name + ".weight"] = shape
            shapes[b + name + ".bias"] = (shape[0],)
    for i, (o, k) in zip((0, 2, 4, 6, 7), ((1024, text_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes[f"{P}{i}.weight"], shapes[f"{P}{i}.bias"] = (o, k), (o,)
    return shapes


def save_tiny_imagereward(directory, seed: int = 0, vision_heads: int = 2, text_heads: int = 2):
    """(model dir with ImageReward.pt + med_config.json, tokenizer dir). Load with ``vision_heads=2``."""
    d = Path(directory)
    tok_dir = save_bert_tokenizer(d / "tokenizer")
    vocab = len(_load_tok(tok_dir)) + 2  # + BLIP's [DEC] and [ENC], as in the real 30522 + 2
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in imagereward_layout(vocab_size=vocab).items():
        if k.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif "norm" in k.lower() and len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (0.2 if k.startswith("blip.") else shape[-1] ** -0.5)
        sd[k] = t
    # also present in the real file, unused by the reward (BLIP's contrastive projections, the position ids)
    sd["blip.vision_proj.weight"] = torch.randn(8, 32, generator=g)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": text_heads,
           "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
           "vocab_size": vocab, "pad_token_id": 0, "encoder_width": 32, "add_cross_attention": True}
    d.mkdir(parents=True, exist_ok=True)
    torch.save(sd, d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps(med, indent=2))
    return d, tok_dir


# ------------------------------------------------------------------------------------------ OWLv2, TrOCR
def save_tiny_owlv2(directory, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    """An ``Owlv2ForObjectDetection`` directory + ``Owlv2Processor`` (image processor at ``image_size``, tiny
    CLIP tokenizer)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    try:
        from transformers import Owlv2ImageProcessorPil as IP
    except ImportError:
        from transformers import Owlv2ImageProcessor as IP
    d = Path(directory)
    tok = _load_tok(save_clip_tokenizer(d))
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = Owlv2Config(text_config=dict(common, vocab_size=len(tok), max_position_embeddings=16,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                       pad_token_id=tok.pad_token_id),
                      vision_config=dict(common, image_size=image_size, patch_size=patch),
                      projection_dim=32)  # OWL needs projection_dim == text hidden size
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(d)
    Owlv2Processor(image_processor=IP(size={"height": image_size, "width": image_size}),
                   tokenizer=tok).save_pretrained(d)
    return d


def save_tiny_trocr(directory, seed: int = 0, image_size: int = 32) -> Path:
    """A ``VisionEncoderDecoderModel`` (ViT encoder + TrOCR decoder) + ``TrOCRProcessor`` directory, as
    ``microsoft/trocr-*`` are laid out (with a tiny WordPiece tokenizer instead of RoBERTa BPE)."""
    from transformers import (TrOCRConfig, TrOCRForCausalLM, TrOCRProcessor, ViTConfig, ViTModel,
                              VisionEncoderDecoderModel)
    try:
        from transformers import ViTImageProcessorPil as IP
    except ImportError:
        from transformers import ViTImageProcessor as IP
    d = Path(directory)
    tok = _load_tok(save_bert_tokenizer(d))
    torch.manual_seed(seed)
    enc = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2), add_pooling_layer=False)
    dec = TrOCRForCausalLM(TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, decoder_attention_heads=2,
                                       decoder_ffn_dim=64, max_position_embeddings=64, cross_attention_hidden_size=32,
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                       eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.cls_token_id))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id = tok.cls_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.sep_token_id
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.eval().save_pretrained(d)
    TrOCRProcessor(image_processor=IP(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3), tokenizer=tok).save_pretrained(d)
    return d

