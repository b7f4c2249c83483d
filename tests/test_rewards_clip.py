"""CLIP-family rewards (clipscore, pickscore, aesthetic, hpsv2) on tiny random replicas saved in the real
on-disk formats and loaded through the same loaders as real weights."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowalign.rewards import RewardError, build_reward, to_tensor
from flowalign.rewards import tiny
from flowalign.rewards._common import ImagePreprocess

PROMPTS = ["a photo of a cat", "hello world", "the red circle left of a blue square"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny.save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="session")
def aesthetic_head(tmp_path_factory, clip_dir):
    from transformers import CLIPConfig
    dim = CLIPConfig.from_pretrained(clip_dir).projection_dim
    return tiny.save_tiny_aesthetic_head(tmp_path_factory.mktemp("aes") / "sac+logos+ava1-l14-linearMSE.pth", dim)


@pytest.fixture(scope="session")
def hps(tmp_path_factory):
    return tiny.save_tiny_hpsv2(tmp_path_factory.mktemp("hps"), seed=1)


@pytest.fixture(scope="session")
def reference(clip_dir):
    """The tiny model, tokenizer and PIL image processor as transformers loads them."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
    return (CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir),
            CLIPImageProcessorPil.from_pretrained(clip_dir))


def smooth_images(n=3, h=48, w=40, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        f = rng.uniform(0.05, 0.4, (3, 2))
        ph = rng.uniform(0, 6, 3)
        out.append(np.stack([127 + 120 * np.sin(xx * f[c, 0] + ph[c]) * np.cos(yy * f[c, 1])
                             for c in range(3)], -1).astype(np.uint8))
    return out


def reference_cosine(reference, images, prompts):
    """cos(image, text) of the tiny CLIPModel called on the transformers processor's outputs."""
    model, tok, ip = reference
    px = torch.as_tensor(np.asarray(ip(images=images, return_tensors="np")["pixel_values"]))
    enc = tok(prompts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
              return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
    return (out.image_embeds * out.text_embeds).sum(-1), out


# ------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("h, w, size", [(48, 40, 32), (40, 64, 32), (20, 24, 32), (300, 200, 224), (64, 64, 32)])
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_preprocessing_parity_with_pil_processor(h, w, size, kind):
    from transformers import CLIPImageProcessorPil
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if kind == "noise" else smooth_images(1, h, w)[0]
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = torch.as_tensor(np.asarray(ip(images=[img], return_tensors="np")["pixel_values"]))
    ours = ImagePreprocess.from_image_processor(ip)(to_tensor([img]))
    assert ours.shape == ref.shape == (1, 3, size, size)
    diff = (ours - ref).abs()
    # PIL rounds to uint8 after each of its two passes: about one grey level at most (/ the smallest std, 0.2613);
    # a single float pass without the intermediate clip is off by up to ~15 levels on noise
    assert diff.max() < 1.5 / 255 / 0.2613 and diff.mean() < 0.006


def test_preprocessing_is_differentiable():
    pre = ImagePreprocess(32, (32, 32))
    x = torch.rand(2, 3, 50, 40, requires_grad=True)
    pre(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------- clipscore
def test_clipscore_matches_model_on_processor_outputs(clip_dir, reference):
    imgs = smooth_images()
    r = build_reward("clipscore", path=str(clip_dir))
    assert r.differentiable and r.size == 32
    out = r(imgs, PROMPTS)
    ref_cos, _ = reference_cosine(reference, imgs, PROMPTS)
    assert torch.allclose(out["cosine"], ref_cos, atol=2e-3), (out["cosine"], ref_cos)
    assert torch.equal(out["reward"], out["cosine"])
    assert out["reward"].abs().max() <= 1 + 1e-6


def test_clipscore_modes_by_formula(clip_dir):
    x = to_tensor(smooth_images(seed=3))
    cos = build_reward("clipscore", path=str(clip_dir))(x, PROMPTS)["cosine"]
    cs = build_reward("clipscore", path=str(clip_dir), mode="clipscore")(x, PROMPTS)["reward"]
    x100 = build_reward("clipscore", path=str(clip_dir), mode="x100")(x, PROMPTS)["reward"]
    assert torch.allclose(cs, 2.5 * cos.clamp(min=0)) and torch.allclose(x100, 100 * cos.clamp(min=0))
    with pytest.raises(RewardError, match="mode must be one of"):
        build_reward("clipscore", path=str(clip_dir), mode="x1000")


def test_clipscore_gradient_determinism_batching(clip_dir):
    r = build_reward("clipscore", path=str(clip_dir), batch_size=2)
    x = torch.rand(5, 3, 36, 36, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = PROMPTS + PROMPTS[:2]
    out = r(x, prompts)["reward"]
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    again = build_reward("clipscore", path=str(clip_dir), batch_size=64)(x.detach(), prompts)["reward"]
    assert torch.allclose(out.detach(), again, atol=1e-6)  # chunking does not change scores
    assert again.grad_fn is None


def test_clipscore_repeated_prompts_embedded_once_same_scores(clip_dir):
    r = build_reward("clipscore", path=str(clip_dir))
    x = to_tensor(smooth_images(4, seed=5))
    grouped = r(x, ["a cat"] * 2 + ["a dog"] * 2)["reward"]
    single = torch.cat([r(x[i:i + 1], [p])["reward"] for i, p in enumerate(["a cat"] * 2 + ["a dog"] * 2)])
    assert torch.allclose(grouped, single, atol=1e-6)


def test_clipscore_bfloat16_runs(clip_dir):
    out = build_reward("clipscore", path=str(clip_dir), dtype="bf16")(to_tensor(smooth_images()), PROMPTS)["reward"]
    ref = build_reward("clipscore", path=str(clip_dir))(to_tensor(smooth_images()), PROMPTS)["reward"]
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=0.05)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(RewardError) as e:
        build_reward("clipscore", path=str(tmp_path / "nowhere"))
    assert f"weight directory not found: {tmp_path / 'nowhere'}" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardError) as e:
        build_reward("clipscore", path=str(empty))
    assert str(empty) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RewardError, match="weight file not found: /no/such/head.pth"):
        build_reward("aesthetic", path="/no/such/head.pth")
    with pytest.raises(RewardError, match="weight file not found: /no/such/HPS.pt"):
        build_reward("hpsv2", path="/no/such/HPS.pt")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (never touches the network)")
def test_uncached_hub_id_fails_in_one_line():
    with pytest.raises(RewardError) as e:
        build_reward("clipscore", path="flowalign-test/not-a-cached-model")
    assert "flowalign-test/not-a-cached-model" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- pickscore
def test_pickscore_scales(clip_dir, reference):
    imgs = smooth_images(seed=7)
    ref_cos, ref_out = reference_cosine(reference, imgs, PROMPTS)
    scale = reference[0].logit_scale.exp().item()
    r = build_reward("pickscore", path=str(clip_dir))  # processor="auto": the local dir has one
    out = r(imgs, PROMPTS)
    assert torch.allclose(out["reward"], scale * ref_cos, atol=2e-3 * scale)
    assert torch.allclose(out["reward"], torch.diagonal(ref_out.logits_per_image), atol=2e-3 * scale)
    fg = build_reward("pickscore", path=str(clip_dir), scale="flow_grpo")(imgs, PROMPTS)["reward"]
    assert torch.allclose(fg, out["reward"] / 26, atol=1e-6)
    cos = build_reward("pickscore", path=str(clip_dir), scale="cosine", processor=str(clip_dir))(imgs, PROMPTS)
    assert torch.allclose(cos["reward"], out["cosine"], atol=1e-6)


# --------------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_matches_hand_computed_head(clip_dir, aesthetic_head, reference):
    model, _, ip = reference
    imgs = smooth_images(seed=11)
    r = build_reward("aesthetic", path=str(aesthetic_head), clip=str(clip_dir))
    assert r.differentiable and r.size == 32
    out = r(imgs, PROMPTS)["reward"]
    sd = torch.load(aesthetic_head, weights_only=True)
    px = torch.as_tensor(np.asarray(ip(images=imgs, return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        e = F.normalize(emb, dim=-1)
        for i in (0, 2, 4, 6, 7):  # no activations between the linear layers
            e = e @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert torch.allclose(out, e.squeeze(-1), atol=2e-3)
    # a directory holding the .pth works too, and prompts do not matter
    r2 = build_reward("aesthetic", path=str(aesthetic_head.parent), clip=str(clip_dir))
    assert torch.allclose(r2(imgs, ["x"] * 3)["reward"], out, atol=1e-6)


def test_aesthetic_gradient_and_head_mismatch(clip_dir, aesthetic_head, tmp_path):
    r = build_reward("aesthetic", path=str(aesthetic_head), clip=str(clip_dir))
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    r(x, ["a", "b"])["reward"].sum().backward()
    assert x.grad.abs().sum() > 0
    wrong = tiny.save_tiny_aesthetic_head(tmp_path / "h.pth", in_dim=768)
    with pytest.raises(RewardError, match="takes 768-d features but the backbone gives 16-d"):
        build_reward("aesthetic", path=str(wrong), clip=str(clip_dir))


# ------------------------------------------------------------------------------------------------- hpsv2
def oc_block(x, sd, p, heads, mask=None):
    """One open_clip residual attention block, written from open_clip's definition (pre-LN, nn.MultiheadAttention
    with packed in_proj, GELU MLP)."""
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    a = (q @ k.transpose(-1, -2)) / math.sqrt(D // heads)
    if mask is not None:
        a = a + mask
    o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    x = x + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
    h = F.layer_norm(x, (D,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def oc_encode_image(sd, px, heads):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(px, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        x = oc_block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
        i += 1
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def oc_encode_text(sd, ids, heads):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        x = oc_block(x, sd, f"transformer.resblocks.{i}.", heads, mask)
        i += 1
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def test_hpsv2_checkpoint_is_open_clip_layout(hps):
    ckpt, _, _ = hps
    raw = torch.load(ckpt, weights_only=True)
    sd = raw["state_dict"]
    for k in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
              "visual.ln_pre.weight", "visual.ln_post.bias", "visual.transformer.resblocks.1.attn.in_proj_weight",
              "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
              "ln_final.weight", "text_projection", "logit_scale"):
        assert k in sd, k
    assert sd["visual.proj"].shape == (64, 16) and sd["text_projection"].shape == (64, 16)
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert not any(k.startswith(("vision_model", "text_model")) for k in sd)


def test_hpsv2_converter_roundtrip_and_outputs_match_original(hps):
    from flowalign.rewards.hpsv2 import clip_model_from_open_clip, hf_to_open_clip, open_clip_to_hf
    ckpt, tok_dir, original = hps
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    back = open_clip_to_hf(hf_to_open_clip(original.state_dict()))
    orig = {k: v for k, v in original.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    model = clip_model_from_open_clip(sd, vision_head_width=32, text_heads=2)
    from transformers import AutoTokenizer
    enc = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding=True, return_tensors="pt")
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
        b = original(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
        # and an independent open_clip forward written from its definition, on the raw checkpoint
        img = F.normalize(oc_encode_image(sd, px, heads=2), dim=-1)
        txt = F.normalize(oc_encode_text(sd, enc.input_ids, heads=2), dim=-1)
    assert torch.allclose(a.logits_per_image, b.logits_per_image, atol=1e-5)
    assert torch.allclose(a.image_embeds, img, atol=1e-5) and torch.allclose(a.text_embeds, txt, atol=1e-5)


def test_hpsv2_reward_is_cosine_through_the_loader(hps):
    ckpt, tok_dir, original = hps
    r = build_reward("hpsv2", path=str(ckpt), tokenizer=str(tok_dir), vision_head_width=32, text_heads=2)
    assert r.differentiable and r.size == 32
    x = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = r(x, PROMPTS)["reward"]
    from transformers import AutoTokenizer
    enc = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        px = ImagePreprocess(32, (32, 32))(x.detach())
        ref = original(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
    assert torch.allclose(out.detach(), (ref.image_embeds * ref.text_embeds).sum(-1), atol=1e-5)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    # the directory form finds the file by version name
    r2 = build_reward("hpsv2", path=str(ckpt.parent), version="v2.1", tokenizer=str(tok_dir),
                      vision_head_width=32, text_heads=2)
    assert torch.allclose(r2(x.detach(), PROMPTS)["reward"], out.detach(), atol=1e-6)
    with pytest.raises(RewardError, match="HPS_v2_compressed.pt not found in directory"):
        build_reward("hpsv2", path=str(ckpt.parent), version="v2", tokenizer=str(tok_dir))


def test_hpsv2_converter_rejects_what_it_cannot_map(hps, tmp_path):
    from flowalign.rewards.hpsv2 import open_clip_to_hf
    sd = dict(torch.load(hps[0], weights_only=True)["state_dict"])
    sd["transformer.resblocks.0.ls_1.gamma"] = torch.ones(64)
    with pytest.raises(RewardError, match="cannot map, e.g. 'transformer.resblocks.0.ls_1.gamma'"):
        open_clip_to_hf(sd)
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(RewardError, match="not an open_clip ViT state dict"):
        build_reward("hpsv2", path=str(tmp_path / "bad.pt"), tokenizer=str(hps[1]))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip not installed (optional extra 'openclip'): converter checked against our own "
                           "open_clip-definition forward instead")
def test_hpsv2_converter_matches_real_open_clip(hps):  # pragma: no cover - runs only where open_clip exists
    import open_clip
    from transformers import AutoTokenizer

    from flowalign.rewards.hpsv2 import clip_model_from_open_clip
    ckpt, tok_dir, _ = hps
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    oc = open_clip.CLIP(embed_dim=16,
                        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8, mlp_ratio=2.0),
                        text_cfg=dict(context_length=32, vocab_size=sd["token_embedding.weight"].shape[0], width=64,
                                      heads=2, layers=2, mlp_ratio=2.0)).eval()
    oc.load_state_dict(sd, strict=False)
    ids = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", max_length=32,
                                                 return_tensors="pt").input_ids
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = clip_model_from_open_clip(sd, vision_head_width=32, text_heads=2)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
        img = F.normalize(oc.encode_image(px), dim=-1)
        txt = F.normalize(oc.encode_text(ids), dim=-1)
    assert torch.allclose(out.image_embeds, img, atol=1e-5) and torch.allclose(out.text_embeds, txt, atol=1e-5)
