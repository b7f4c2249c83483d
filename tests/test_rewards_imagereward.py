"""ImageReward on a tiny replica saved in the real checkpoint layout (ImageReward.pt + med_config.json + a BERT
WordPiece tokenizer), checked against an independent BLIP forward written from BLIP's definition."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowalign.rewards import RewardError, build_reward, to_tensor
from flowalign.rewards import tiny
from flowalign.rewards.imagereward import MEAN, STD

PROMPTS = ["a photo of a cat", "a red circle left of a blue square", "hello world sign"]


@pytest.fixture(scope="session")
def ir(tmp_path_factory):
    return tiny.save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=0)


@pytest.fixture(scope="session")
def reward(ir):
    model_dir, tok_dir = ir
    return build_reward("imagereward", path=str(model_dir), tokenizer=str(tok_dir), vision_heads=2)


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _attend(q, k, v, heads, mask=None):
    B, Nq, D = q.shape
    q, k, v = (t.reshape(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    a = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if mask is not None:
        a = a + mask
    return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, Nq, D)


def reference_imagereward(sd, med, px, ids, attn, vision_heads):
    """ImageReward.score_gard from BLIP's definition: timm ViT (pre-LN, packed qkv, eps 1e-6, final norm over all
    tokens) -> BERT layers (post-LN, self-attention with the padding mask, cross-attention to all image tokens)
    -> [CLS] -> linear stack -> (x - mean) / std."""
    V, T = "blip.visual_encoder.", "blip.text_encoder."
    w = sd[V + "patch_embed.proj.weight"]
    x = F.conv2d(px, w, sd[V + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[V + "pos_embed"]
    i = 0
    while f"{V}blocks.{i}.norm1.weight" in sd:
        b = f"{V}blocks.{i}."
        q, k, v = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, -1)
        x = x + _lin(_attend(q, k, v, vision_heads), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        i += 1
    img = _ln(x, sd, V + "norm", 1e-6)
    eps, heads = med["layer_norm_eps"], med["num_attention_heads"]
    h = sd[T + "embeddings.word_embeddings.weight"][ids] + sd[T + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = _ln(h, sd, T + "embeddings.LayerNorm", eps)
    mask = (1.0 - attn[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
    i = 0
    while f"{T}encoder.layer.{i}.intermediate.dense.weight" in sd:
        b = f"{T}encoder.layer.{i}."
        s = b + "attention."
        a = _attend(_lin(h, sd, s + "self.query"), _lin(h, sd, s + "self.key"), _lin(h, sd, s + "self.value"), heads, mask)
        h = _ln(_lin(a, sd, s + "output.dense") + h, sd, s + "output.LayerNorm", eps)
        c = b + "crossattention."
        a = _attend(_lin(h, sd, c + "self.query"), _lin(img, sd, c + "self.key"), _lin(img, sd, c + "self.value"), heads)
        h = _ln(_lin(a, sd, c + "output.dense") + h, sd, c + "output.LayerNorm", eps)
        f = F.gelu(_lin(h, sd, b + "intermediate.dense"))
        h = _ln(_lin(f, sd, b + "output.dense") + h, sd, b + "output.LayerNorm", eps)
        i += 1
    e = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        e = _lin(e, sd, f"mlp.layers.{j}")
    return ((e - MEAN) / STD).squeeze(-1)


def test_checkpoint_files_are_in_the_real_layout(ir):
    model_dir, tok_dir = ir
    assert sorted(p.name for p in model_dir.iterdir() if p.is_file()) == ["ImageReward.pt", "med_config.json"]
    sd = torch.load(model_dir / "ImageReward.pt", weights_only=True)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in sd and "mlp.layers.7.bias" in sd
    assert "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight" in sd
    assert (tok_dir / "vocab.txt").is_file()


def test_matches_independent_blip_forward(ir, reward):
    model_dir, _ = ir
    sd = torch.load(model_dir / "ImageReward.pt", weights_only=True)
    med = json.loads((model_dir / "med_config.json").read_text())
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    out = reward(x, PROMPTS)["reward"]
    px = reward.preprocess(x)
    tok = reward.tokenize(PROMPTS)
    assert tok["input_ids"].shape == (3, 35) and (tok["attention_mask"][:, -1] == 0).all()  # padded to 35
    ref = reference_imagereward(sd, med, px, tok["input_ids"], tok["attention_mask"], vision_heads=2)
    assert torch.allclose(out, ref, atol=1e-4), (out, ref)
    assert out.std() > 1e-3  # the replica is not degenerate: images/prompts change the score


def test_preprocessing_matches_pil_processor_and_gradients_flow(reward):
    from transformers import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    px = torch.as_tensor(np.asarray(ip(images=imgs, return_tensors="np")["pixel_values"]))
    assert (reward.preprocess(to_tensor(imgs)) - px).abs().max() < 1.5 / 255 / 0.2613
    with torch.no_grad():
        via_processor = reward.score_pixels(px, PROMPTS)
    assert torch.allclose(reward(imgs, PROMPTS)["reward"], via_processor, atol=5e-3)
    x = to_tensor(imgs).requires_grad_(True)
    reward(x, PROMPTS)["reward"].sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_deterministic_and_batch_independent(ir, reward):
    model_dir, tok_dir = ir
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS + ["two dogs"]
    a = reward(x, prompts)["reward"]
    assert torch.equal(a, reward(x, prompts)["reward"])
    small = build_reward("imagereward", path=str(model_dir), tokenizer=str(tok_dir), vision_heads=2, batch_size=1)
    assert torch.allclose(small(x, prompts)["reward"], a, atol=1e-5)


def test_direct_checkpoint_file_and_default_med_config_guard(ir, tmp_path):
    model_dir, tok_dir = ir
    r = build_reward("imagereward", path=str(model_dir / "ImageReward.pt"), tokenizer=str(tok_dir), vision_heads=2)
    assert r.size == 32
    lonely = tmp_path / "only_ckpt"
    lonely.mkdir()
    shutil.copy(model_dir / "ImageReward.pt", lonely / "ImageReward.pt")
    # without med_config.json the BERT-base defaults apply, which do not fit the tiny checkpoint: a clear error
    with pytest.raises(RewardError, match="med_config hidden_size 768 does not match the checkpoint's 32"):
        build_reward("imagereward", path=str(lonely), tokenizer=str(tok_dir), vision_heads=2)
    ok = build_reward("imagereward", path=str(lonely), tokenizer=str(tok_dir), vision_heads=2,
                      med_config=str(model_dir / "med_config.json"))
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(ok(x, ["a cat"])["reward"], r(x, ["a cat"])["reward"])


def test_missing_files_are_named(ir, tmp_path):
    _, tok_dir = ir
    with pytest.raises(RewardError, match=f"ImageReward.pt not found in directory {tmp_path}"):
        build_reward("imagereward", path=str(tmp_path), tokenizer=str(tok_dir))
    with pytest.raises(RewardError, match="weight file not found: /no/such/ImageReward.pt"):
        build_reward("imagereward", path="/no/such/ImageReward.pt")
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardError, match="lacks .* expected key"):
        build_reward("imagereward", path=str(tmp_path), tokenizer=str(tok_dir))
