"""Framework overhead of flowalign's rollout and train step, as ratios measured in one run.

1. Rollout: our SDE rollout with per-step log-probs vs the stock diffusers pipeline sampling the same prompts,
   steps and CFG (``pipe(...)``, ODE): images/s and the ratio.
2. Train step, per update on the same rows: our policy forward+backward through ``replay_step`` + GRPO loss
   (+ reference forward and exact KL when beta > 0) vs a bare transformer forward+backward of the same rows
   (CFG doubles the rows in both).
Both on the shipped ShapeWorld model and, for the train step, on a randomly initialised SD3 transformer of
realistic width (about 150 M parameters), where Python overhead no longer hides behind a tiny model.

usage: python benchmarks/bench_trainer.py [--big-layers 12] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowalign.algorithms.grpo import grpo_step_loss  # noqa: E402
from flowalign.pipelines.sd3 import SD3Adapter  # noqa: E402
from flowalign.rollout import replay_step, rollout, sde_mask  # noqa: E402
from flowalign.samplers import gaussian_kl  # noqa: E402
from flowalign.shapeworld import MODEL_DIR  # noqa: E402


def best(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def train_step_ratio(ad: SD3Adapter, B: int, repeats: int, beta: float, guidance: float = 2.0):
    prompts = ["a photo of a red circle left of a blue square"] * B
    sig = ad.schedule(10)
    tr = rollout(ad, ad.encode(prompts), sig, guidance, 0.7, sde_mask(10), generator=torch.Generator().manual_seed(0),
                 prompts=prompts, decode=False)
    adv = torch.randn(B)
    params = ad.trainable_parameters()

    def ours():
        out = replay_step(ad, tr, 2)
        kl = None
        if beta > 0:
            with torch.no_grad(), ad.reference():
                ref = replay_step(ad, tr, 2)
            kl = gaussian_kl(out.mean, ref.mean, out.std)
        loss, _ = grpo_step_loss(out.log_prob, tr.log_probs[:, 2], adv, 1e-4, beta, kl)
        loss.backward()
        for p in params:
            p.grad = None

    x = tr.latents[:, 2]
    c = tr.cond
    t = torch.full((2 * B,), float(sig[2]) * 1000)

    def bare():
        out = ad.transformer(hidden_states=torch.cat([x, x]), timestep=t,
                             encoder_hidden_states=torch.cat([c.neg_embeds, c.embeds]),
                             pooled_projections=torch.cat([c.neg_pooled, c.pooled]), return_dict=False)[0]
        u, cc = out.chunk(2)
        (u + guidance * (cc - u)).pow(2).mean().backward()
        for p in params:
            p.grad = None

    tb, to = best(bare, repeats), best(ours, repeats)
    return tb, to, to / tb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ad = SD3Adapter.from_pretrained(a.model)
    B, steps = 64, 10
    prompts = ["a photo of a red circle left of a blue square"] * B
    sig = ad.schedule(steps)

    def ours_roll():
        rollout(ad, ad.encode(prompts), sig, 2.0, 0.7, sde_mask(steps), generator=torch.Generator().manual_seed(0),
                prompts=prompts)

    def stock_roll():
        ad.pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=2.0, height=32, width=32,
                max_sequence_length=0, output_type="pt", generator=torch.Generator().manual_seed(0))

    ts, to = best(stock_roll, a.repeats), best(ours_roll, a.repeats)
    print(f"rollout, {B} images x {steps} steps, CFG 2: stock pipeline {B / ts:.0f} img/s, "
          f"flowalign (SDE + log-probs) {B / to:.0f} img/s, ratio {to / ts:.2f}")
    ad.full_finetune()
    ad.freeze_reference()
    for beta in (0.0, 0.02):
        tb, t_o, r = train_step_ratio(ad, B, a.repeats, beta)
        print(f"train step, tiny model (2.3 M, full fine-tune), batch {B} with CFG, beta={beta}: bare fwd+bwd "
              f"{tb * 1e3:.0f} ms, flowalign {t_o * 1e3:.0f} ms, ratio {r:.2f}")
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    big_tr = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=a.big_layers,
                                   attention_head_dim=64, num_attention_heads=12, joint_attention_dim=64,
                                   caption_projection_dim=768, pooled_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=32)
    ad.pipe.transformer = big_tr
    big = SD3Adapter(ad.pipe)
    n = sum(p.numel() for p in big_tr.parameters()) / 1e6
    params = big.add_lora(rank=32, alpha=64)
    B = 4
    for beta in (0.0, 0.02):
        tb, t_o, r = train_step_ratio(big, B, max(2, a.repeats // 2), beta)
        print(f"train step, random SD3 transformer {n:.0f} M params (LoRA r32, 32x32 latents = 256 tokens), "
              f"batch {B} with CFG, beta={beta}: bare fwd+bwd {tb * 1e3:.0f} ms, flowalign {t_o * 1e3:.0f} ms, "
              f"ratio {r:.2f}")
    del params


if __name__ == "__main__":
    main()
