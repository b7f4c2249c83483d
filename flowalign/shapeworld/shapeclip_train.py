"""Train ``shapeclip``: a tiny CLIP (``transformers.CLIPModel``) on ShapeWorld renders and their prompts.

``python -m flowalign.shapeworld.shapeclip_train --out rewards/assets/shapeclip --steps 4000 --seed 0``

- Data: a stream of scenes for the *seen* prompts only (``prompts.split()``), balanced over tasks, rendered at
  32 px and jittered (1 px shifts, blur, brightness/contrast/colour gain, Gaussian noise) so the encoder also
  reads imperfect samples.
- Captions: every step encodes *all* seen prompts (~360), so each image is classified against the whole caption
  set, which contains every hard negative (the same scene's prompt with swapped colours, shapes, relations or
  counts) that is a seen prompt. Targets are multi-positive: a caption is a positive for an image when the
  scene satisfies it under the GenEval rules (a red circle satisfies "a photo of a circle").
- Loss: image->caption cross-entropy over all captions + caption->image cross-entropy over the batch
  (both multi-positive) + a pairwise hinge-free logistic term ``softplus(s_neg - s_true)`` on explicit hard
  negatives of each image's own prompt.
- Fixed seed and step count (never a wall-clock stop); AdamW, linear warm-up then cosine decay.
Saved with ``save_pretrained`` (model), the ShapeWorld ``CLIPTokenizer`` files and a ``preprocessor_config.json``
(``CLIPImageProcessor``: 32 px, mean/std 0.5), plus ``training_report.json`` with the held-out retrieval accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import all_metadata, split
from .tokenizer import MAX_LENGTH, write_tokenizer
from .world import COLORS, IMAGE_SIZE, NUMBERS, RELATIONS, SHAPES, TASKS, make_metadata, render, scene_for

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class ShapeClipRecipe:
    seed: int = 0
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hard_weight: float = 1.0
    hidden: int = 64
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    patch: int = 4
    projection_dim: int = 64
    jitter: bool = True
    eval_per_task: int = 100


# ------------------------------------------------------------------------------------------ ground truth
def pseudo_detections(objs: list[dict]) -> list[dict]:
    """Scene objects as the detector would report them (a triangle's area centroid sits 0.2 r below its centre)."""
    return [{"cls": o["shape"], "color": o["color"], "score": 1.0,
             "centroid": (o["x"], o["y"] + (0.2 * o["r"] if o["shape"] == "triangle" else 0.0))} for o in objs]


def satisfies(meta: dict, objs: list[dict]) -> bool:
    """Does the scene satisfy the prompt under the GenEval rules (judged on the exact objects)?"""
    from flowalign.eval.geneval import judge

    need = {c["class"] for c in meta["include"]}
    if not need <= {o["shape"] for o in objs}:
        return False
    return judge(meta, pseudo_detections(objs))[0]


def hard_negatives(meta: dict) -> list[dict]:
    """Prompts that differ from ``meta`` in one attribute: a colour, a shape, the relation, the order, the count."""
    t, inc = meta["tag"], meta["include"]
    out = []
    if t == "single_object":
        out = [make_metadata(t, shape=s) for s in SHAPES if s != inc[0]["class"]]
    elif t == "colors":
        s, c = inc[0]["class"], inc[0]["color"]
        out = ([make_metadata(t, shape=s, color=c2) for c2 in COLORS if c2 != c]
               + [make_metadata(t, shape=s2, color=c) for s2 in SHAPES if s2 != s])
    elif t == "counting":
        s, n = inc[0]["class"], inc[0]["count"]
        out = ([make_metadata(t, shape=s, n=n2) for n2 in NUMBERS if n2 != n]
               + [make_metadata(t, shape=s2, n=n) for s2 in SHAPES if s2 != s])
    elif t == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        out = ([make_metadata(t, a=a2, b=b) for a2 in SHAPES if a2 not in (a, b)]
               + [make_metadata(t, a=a, b=b2) for b2 in SHAPES if b2 not in (a, b)])
    elif t == "color_attr":
        a, b, ca, cb = inc[0]["class"], inc[1]["class"], inc[0]["color"], inc[1]["color"]
        out = ([make_metadata(t, a=a, b=b, ca=cb, cb=ca), make_metadata(t, a=b, b=a, ca=ca, cb=cb)]
               + [make_metadata(t, a=a, b=b, ca=c, cb=cb) for c in COLORS if c not in (ca, cb)]
               + [make_metadata(t, a=a, b=b, ca=ca, cb=c) for c in COLORS if c not in (ca, cb)])
    elif t == "position":
        b, a, rel = inc[0]["class"], inc[1]["class"], inc[1]["position"][0]
        out = ([make_metadata(t, a=b, b=a, rel=rel)]
               + [make_metadata(t, a=a, b=b, rel=r) for r in RELATIONS if r != rel])
    return out


# ------------------------------------------------------------------------------------------ model
def build_model(tokenizer, r: ShapeClipRecipe):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(r.seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=r.hidden, intermediate_size=2 * r.hidden,
                num_hidden_layers=r.text_layers, num_attention_heads=r.heads, max_position_embeddings=MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    vision = dict(image_size=IMAGE_SIZE, patch_size=r.patch, num_channels=3, hidden_size=r.hidden,
                  intermediate_size=2 * r.hidden, num_hidden_layers=r.vision_layers, num_attention_heads=r.heads,
                  hidden_act="gelu")
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=r.projection_dim)
    return CLIPModel(cfg)


def image_embeds(model, pixels01: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of (B,3,32,32) images in [0,1] (differentiable)."""
    mean = torch.tensor(IMAGE_MEAN, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=pixels01.dtype, device=pixels01.device).view(1, 3, 1, 1)
    pooled = model.vision_model(pixel_values=(pixels01 - mean) / std).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def text_embeds(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    dev = next(model.parameters()).device
    tok = tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    pooled = model.text_model(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev)).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


# ------------------------------------------------------------------------------------------ data
def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random 1 px shift, blur (half the images), contrast/brightness/colour gain and noise."""
    B = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (B,), generator=gen), torch.randint(0, 3, (B,), generator=gen)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]] for i in range(B)])
    sig = 0.3 + 0.6 * u(B)
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sig[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = torch.where((u(B) < 0.5)[:, None], k, torch.tensor([0, 0, 1.0, 0, 0]))  # half the images unblurred
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    kh = k.repeat_interleave(3, 0).view(3 * B, 1, 1, 5)
    kv = k.repeat_interleave(3, 0).view(3 * B, 1, 5, 1)
    y = F.conv2d(xp.reshape(1, 3 * B, *xp.shape[2:]), kh, groups=3 * B)
    y = F.conv2d(y, kv, groups=3 * B).view_as(x)
    c = 0.9 + 0.2 * u(B, 1, 1, 1)
    b = 0.08 * (u(B, 1, 1, 1) - 0.5)
    g = 0.95 + 0.1 * u(B, 3, 1, 1)
    y = (y - 0.5) * c * g + 0.5 + b
    y = y + (0.04 * u(B, 1, 1, 1)) * torch.randn(y.shape, generator=gen)
    return y.clamp(0, 1)


class SceneCaptionStream:
    """Batches of (seen prompt index, scene, render) balanced over tasks."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        seen, _ = split()
        self.by_task = {t: seen[t] for t in TASKS}
        self.captions = [m for t in TASKS for m in seen[t]]
        self.index = {m["prompt"]: i for i, m in enumerate(self.captions)}

    def batch(self, n: int):
        metas, scenes, ims = [], [], []
        for _ in range(n):
            m = self.rng.choice(self.by_task[self.rng.choice(TASKS)])
            objs = scene_for(m, self.rng)
            metas.append(m)
            scenes.append(objs)
            ims.append(np.asarray(render(objs)))
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255
        return metas, scenes, x


def positives(captions: list[dict], scenes: list[list[dict]]) -> torch.Tensor:
    """(B, N) bool: caption j is satisfied by scene i."""
    return torch.tensor([[satisfies(m, objs) for m in captions] for objs in scenes])


def multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """-log sum_{positives} softmax(logits), averaged over rows (every row needs a positive)."""
    return (torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~pos, -1e4), -1)).mean()


def clip_loss(model, tokenizer, captions: list[dict], metas, scenes, x, hard_weight: float = 1.0,
              index: dict | None = None) -> torch.Tensor:
    index = index or {m["prompt"]: i for i, m in enumerate(captions)}
    img = image_embeds(model, x)
    txt = text_embeds(model, tokenizer, [m["prompt"] for m in captions])
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (B, N)
    pos = positives(captions, scenes)
    true = torch.tensor([index[m["prompt"]] for m in metas])
    pos[torch.arange(len(metas)), true] = True
    l_i2t = multi_positive_ce(logits, pos)
    l_t2i = multi_positive_ce(logits[:, true].T, pos[:, true].T)
    loss = 0.5 * (l_i2t + l_t2i)
    if hard_weight:
        rows, cols = [], []
        for i, m in enumerate(metas):
            for h in hard_negatives(m):
                j = index.get(h["prompt"])
                if j is not None and not pos[i, j]:
                    rows.append(i)
                    cols.append(j)
        if rows:
            rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
            loss = loss + hard_weight * F.softplus(logits[rows_t, cols_t] - logits[rows_t, true[rows_t]]).mean()
    return loss


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def retrieval_accuracy(model, tokenizer, n_per_task: int = 100, seed: int = 10_000) -> dict:
    """Held-out renders (the shipped test and test_unseen prompt files, fresh scenes): per task, the fraction of
    images whose best-scoring caption among *all* prompts of the task (seen and unseen) is satisfied by the
    scene (top-1), and the fraction of (image, hard negative) pairs where the image's own prompt scores higher."""
    from flowalign.eval.geneval import load_metadata

    from .prompts import prompt_file

    model.eval()
    allm = all_metadata()
    cand_emb = {t: text_embeds(model, tokenizer, [m["prompt"] for m in allm[t]]) for t in TASKS}
    out = {}
    for split_name in ("test", "test_unseen"):
        metas = load_metadata(prompt_file(split_name))
        top1: dict[str, list[bool]] = {}
        hard: dict[str, list[bool]] = {}
        count: dict[str, int] = {}
        for i, m in enumerate(metas):
            t = m["tag"]
            if count.get(t, 0) >= n_per_task:
                continue
            count[t] = count.get(t, 0) + 1
            objs = scene_for(m, random.Random(seed + i))
            x = torch.from_numpy(np.array(render(objs))).permute(2, 0, 1)[None].float() / 255
            e = image_embeds(model, x)
            s = (e @ cand_emb[t].T)[0]
            top1.setdefault(t, []).append(satisfies(allm[t][int(s.argmax())], objs))
            negs = [h for h in hard_negatives(m) if not satisfies(h, objs)]
            if negs:
                sn = (e @ text_embeds(model, tokenizer, [m["prompt"]] + [h["prompt"] for h in negs]).T)[0]
                hard.setdefault(t, []).extend((sn[1:] < sn[0]).tolist())
        out[split_name] = {
            "top1": {t: round(float(np.mean(v)), 4) for t, v in top1.items()},
            "hard_negative": {t: round(float(np.mean(v)), 4) for t, v in hard.items()},
            "n_per_task": count,
        }
        for key in ("top1", "hard_negative"):
            out[split_name][f"{key}_overall"] = round(float(np.mean(list(out[split_name][key].values()))), 4)
    return out


# ------------------------------------------------------------------------------------------ training
def save(model, tokenizer, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "do_convert_rgb": True, "resample": 3}, indent=1))
    return out


def train(out, recipe: ShapeClipRecipe | None = None, progress: bool = True, evaluate: bool = True) -> dict:
    """Train, save to ``out`` and return the report (also written to ``out/training_report.json``), plus the
    per-step ``losses`` and the trained ``model``."""
    from tqdm import tqdm

    r = recipe or ShapeClipRecipe()
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)
    tok = write_tokenizer(out)
    model = build_model(tok, r)
    stream = SceneCaptionStream(r.seed + 1)
    captions, index = stream.captions, stream.index
    gen = torch.Generator().manual_seed(r.seed + 2)
    # a fixed, un-jittered batch to measure the loss before and after training
    fixed = SceneCaptionStream(r.seed + 3).batch(min(r.batch, 64))
    with torch.no_grad():
        loss0 = clip_loss(model, tok, captions, *fixed, hard_weight=r.hard_weight, index=index).item()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay, betas=(0.9, 0.98))
    losses = []
    model.train()
    bar = tqdm(range(r.steps), desc="shapeclip", mininterval=5, disable=not progress)
    for step in bar:
        metas, scenes, x = stream.batch(r.batch)
        if r.jitter:
            x = jitter(x, gen)
        loss = clip_loss(model, tok, captions, metas, scenes, x, r.hard_weight, index)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(r.steps, 1)))
        lr = r.lr * min(1.0, (step + 1) / r.warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    with torch.no_grad():
        loss1 = clip_loss(model, tok, captions, *fixed, hard_weight=r.hard_weight, index=index).item()
    save(model, tok, out)
    report = {"recipe": dataclasses.asdict(r), "fixed_batch_loss_before": round(loss0, 4),
              "fixed_batch_loss_after": round(loss1, 4),
              "train_loss_last100": round(float(np.mean(losses[-100:])), 4) if losses else None,
              "logit_scale": round(model.logit_scale.exp().item(), 3),
              "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    if evaluate:
        report["retrieval"] = retrieval_accuracy(model, tok, r.eval_per_task)
    report["minutes"] = round((time.time() - t0) / 60, 2)
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    report["losses"] = losses
    report["model"] = model
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (e.g. rewards/assets/shapeclip)")
    p.add_argument("--steps", type=int, default=ShapeClipRecipe.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=ShapeClipRecipe.batch)
    p.add_argument("--lr", type=float, default=ShapeClipRecipe.lr)
    p.add_argument("--eval-per-task", type=int, default=ShapeClipRecipe.eval_per_task)
    a = p.parse_args(argv)
    rep = train(a.out, ShapeClipRecipe(seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr,
                                       eval_per_task=a.eval_per_task))
    rep.pop("losses")
    rep.pop("model")
    keys = ("fixed_batch_loss_before", "fixed_batch_loss_after", "logit_scale", "minutes")
    print(json.dumps({k: rep[k] for k in keys}))
    if "retrieval" in rep:
        for s, v in rep["retrieval"].items():
            print(f"{s}: top-1 {v['top1_overall']:.3f} {v['top1']}  hard-negative {v['hard_negative_overall']:.3f}")


if __name__ == "__main__":
    main()
