"""Pre-train the tiny SD3-architecture ShapeWorld pipeline from scratch (``flowalign shapeworld pretrain``).

Two stages, both with a fixed seed and a fixed step count (never a wall-clock stop):
1. an ``AutoencoderKL`` (x4 down: 32 px -> 8x8x4) on renders, L1 + MSE + 1e-4 KL; its latent shift/scale are
   set from latent statistics;
2. two tiny ``CLIPTextModelWithProjection`` encoders and an ``SD3Transformer2DModel`` (patch 2: 16 tokens),
   jointly, by rectified flow (logit-normal sigma, 10% empty prompts for CFG), EMA weights saved.
The result is a plain ``StableDiffusion3Pipeline`` folder (no T5) plus ``recipe.json``.
Scenes come only from the *training* prompts, so held-out combinations stay unseen.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .prompts import split
from .tokenizer import MAX_LENGTH, write_tokenizer
from .world import IMAGE_SIZE, TASKS, render, scene_for


@dataclass
class Recipe:
    seed: int = 0
    size: int = IMAGE_SIZE
    vae_blocks: tuple = (16, 32, 32)
    vae_steps: int = 1600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    text_hidden: int = 32
    text_layers: int = 2
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch: int = 2
    steps: int = 10000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.995
    cfg_drop: float = 0.1
    scheduler_shift: float = 1.0


class SceneStream:
    """Random (prompt, render) pairs over the training prompts, balanced over tasks."""

    def __init__(self, seed: int, size: int):
        self.rng = random.Random(seed)
        self.size = size
        self.seen, _ = split()

    def batch(self, n: int, cfg_drop: float = 0.0):
        prompts, ims = [], []
        for _ in range(n):
            meta = self.rng.choice(self.seen[self.rng.choice(TASKS)])
            ims.append(np.asarray(render(scene_for(meta, self.rng), self.size)))
            prompts.append("" if self.rng.random() < cfg_drop else meta["prompt"])
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return prompts, x


def train_vae(r: Recipe, log):
    from diffusers import AutoencoderKL

    torch.manual_seed(r.seed)
    n = len(r.vae_blocks)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(r.vae_blocks),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=r.size)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    data = SceneStream(r.seed + 1, r.size)
    bar = tqdm(range(r.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        _, x = data.batch(r.vae_batch)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = rec + 1e-4 * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}")
            log(dict(stage="vae", step=step, rec=rec.item()))
    vae.eval()
    _, x = SceneStream(r.seed + 2, r.size).batch(512)
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(128)])
    shift = z.mean().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (z - shift).std().item())
    return vae.requires_grad_(False)


def build_pipeline(r: Recipe, vae, tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(seed):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=r.text_hidden, intermediate_size=2 * r.text_hidden,
                             projection_dim=r.text_hidden, num_hidden_layers=r.text_layers, num_attention_heads=2,
                             max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
        return CLIPTextModelWithProjection(cfg)

    te1, te2 = clip(r.seed + 11), clip(r.seed + 12)
    lat = r.size // 2 ** (len(r.vae_blocks) - 1)
    torch.manual_seed(r.seed)
    tr = SD3Transformer2DModel(sample_size=lat, patch_size=r.patch, in_channels=4, num_layers=r.layers,
                               attention_head_dim=r.head_dim, num_attention_heads=r.heads,
                               joint_attention_dim=2 * r.text_hidden, caption_projection_dim=r.heads * r.head_dim,
                               pooled_projection_dim=2 * r.text_hidden, out_channels=4, pos_embed_max_size=lat // r.patch)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=r.scheduler_shift),
                                    vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def train_flow(r: Recipe, pipe, log):
    tr, te1, te2, vae = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae
    mods = [tr, te1, te2]
    params = [p for m in mods for p in m.parameters()]
    for m in mods:
        m.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    data = SceneStream(r.seed + 3, r.size)
    gen = torch.Generator().manual_seed(r.seed + 4)
    losses = []
    bar = tqdm(range(r.steps), desc="flow", mininterval=5)
    for step in bar:
        prompts, x = data.batch(r.batch, r.cfg_drop)
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.sample(generator=gen) - sh) * sf
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=0)
        sig = torch.sigmoid(torch.randn(z.shape[0], generator=gen))
        noise = torch.randn(z.shape, generator=gen)
        s4 = sig.view(-1, 1, 1, 1)
        pred = tr(hidden_states=(1 - s4) * z + s4 * noise, encoder_hidden_states=pe, pooled_projections=pooled,
                  timestep=sig * 1000, return_dict=False)[0]
        loss = (pred - (noise - z)).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = r.lr * min(1.0, (step + 1) / r.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(r.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
            log(dict(stage="flow", step=step + 1, loss=float(np.mean(losses[-100:]))))
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in mods:
        m.eval().requires_grad_(False)


def pretrain(out_dir, recipe: Recipe | None = None) -> Path:
    r = recipe or Recipe()
    torch.manual_seed(r.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "pretrain_log.jsonl", "w")
    t0 = time.time()

    def log(rec):
        logf.write(json.dumps(dict(rec, minutes=round((time.time() - t0) / 60, 2))) + "\n")
        logf.flush()

    tok = write_tokenizer(out / "_tokenizer")
    vae = train_vae(r, log)
    pipe = build_pipeline(r, vae, tok)
    train_flow(r, pipe, log)
    pipe.save_pretrained(str(out))
    rec = dataclasses.asdict(r)
    rec["minutes"] = round((time.time() - t0) / 60, 1)
    rec["torch"] = torch.__version__
    (out / "recipe.json").write_text(json.dumps(rec, indent=1))
    logf.close()
    import shutil
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out
