"""Train the ``artifact`` reward's head: clean ShapeWorld renders vs programmatically corrupted ones.

``python -m flowalign.shapeworld.artifact_train --out rewards/assets/artifact --steps 3000 --seed 0`` (about a minute)

- Data: scenes for the *seen* prompts, rendered at 32 px; half stay clean, half get one corruption from
  ``flowalign.shapeworld.artifacts`` (uniform over the kinds, random strength; 20% get a second one). Every
  image, clean or not, then gets the same mild jitter as ``shapeclip`` (1 px shift, light blur, contrast/colour
  gain, noise sigma <= 0.04), so the jitter itself is not a cue and mildly imperfect samples count as clean.
- Model: ``flowalign.rewards.artifact.ArtifactNet``: frozen seeded random conv features (never trained),
  standardised with statistics of the training set, and a 2-layer MLP head trained with logistic loss (AdamW,
  fixed seed, fixed step count). Features are computed once, so training the head takes seconds.
- Report (``training_report.json``): on fresh held-out images, the ROC AUC clean-vs-corrupted per corruption
  kind and overall, and the false-positive rate on clean images at p = 0.5.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .artifacts import CORRUPTIONS, corrupt
from .prompts import split
from .world import TASKS, render, scene_for


@dataclass
class ArtifactRecipe:
    seed: int = 0
    n_train: int = 24000
    steps: int = 3000
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    widths: tuple = (16, 32, 64)
    hidden: int = 64
    feature_seed: int = 0
    p_double: float = 0.2
    n_eval: int = 1000


def make_images(n: int, seed: int, p_double: float = 0.2, jitter: bool = True):
    """n images (float (n,3,32,32) in [0,1]), labels (1 = corrupted) and kinds ('clean' or a corruption name).
    Even indices are clean, odd ones corrupted."""
    from .shapeclip_train import jitter as jitter_fn

    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    seen, _ = split()
    imgs, labels, kinds = [], [], []
    for i in range(n):
        m = prng.choice(seen[prng.choice(TASKS)])
        im = np.array(render(scene_for(m, prng)))
        kind = "clean"
        if i % 2:
            im, kind = corrupt(im, rng)
            if rng.uniform() < p_double:
                im, k2 = corrupt(im, rng)
                kind = f"{kind}+{k2}"
        imgs.append(im)
        labels.append(float(i % 2))
        kinds.append(kind)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    if jitter:
        x = jitter_fn(x, torch.Generator().manual_seed(seed + 1))
    return x, torch.tensor(labels), kinds


@torch.no_grad()
def features(net, n: int, seed: int, p_double: float, chunk: int = 512, progress=None):
    feats, labels, kinds = [], [], []
    for i, start in enumerate(range(0, n, chunk)):
        x, y, k = make_images(min(chunk, n - start), seed * 1000 + i, p_double)
        feats.append(net.raw_features(x))
        labels.append(y)
        kinds += k
        if progress is not None:
            progress.update(len(y))
    return torch.cat(feats), torch.cat(labels), kinds


def auc(pos_scores, neg_scores) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (ROC AUC)."""
    p, q = np.asarray(pos_scores, np.float64), np.asarray(neg_scores, np.float64)
    if not len(p) or not len(q):
        return float("nan")
    return float(((p[:, None] > q[None]).sum() + 0.5 * (p[:, None] == q[None]).sum()) / (len(p) * len(q)))


@torch.no_grad()
def evaluate(net, n: int = 1000, seed: int = 777, p_double: float = 0.0) -> dict:
    """AUC (artifact logit of corrupted vs clean) per corruption kind and overall, on fresh images."""
    net.eval()
    x, y, kinds = make_images(n, seed, p_double)
    logit = torch.cat([net(c) for c in x.split(512)]).numpy()
    clean = logit[y.numpy() == 0]
    out = {"auc": {}, "n": n}
    for k in CORRUPTIONS:
        sel = [i for i, kk in enumerate(kinds) if kk == k]
        out["auc"][k] = round(auc(logit[sel], clean), 4)
    out["auc_overall"] = round(auc(logit[y.numpy() == 1], clean), 4)
    out["clean_false_positive_rate"] = round(float((clean > 0).mean()), 4)
    out["corrupted_detection_rate"] = round(float((logit[y.numpy() == 1] > 0).mean()), 4)
    return out


def train(out, recipe: ArtifactRecipe | None = None, progress: bool = True, evaluate_after: bool = True) -> dict:
    from tqdm import tqdm

    from flowalign.rewards.artifact import ArtifactNet

    r = recipe or ArtifactRecipe()
    t0 = time.time()
    torch.manual_seed(r.seed)
    net = ArtifactNet(widths=r.widths, hidden=r.hidden, feature_seed=r.feature_seed)
    bar = tqdm(total=r.n_train, desc="artifact data", mininterval=5, disable=not progress)
    f, y, _ = features(net, r.n_train, r.seed + 1, r.p_double, progress=bar)
    bar.close()
    net.feat_mean.copy_(f.mean(0))
    net.feat_std.copy_(f.std(0).clamp_min(1e-4))
    fn = (f - net.feat_mean) / net.feat_std
    opt = torch.optim.AdamW(net.head.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    gen = torch.Generator().manual_seed(r.seed + 2)
    losses = []
    net.train()
    bar = tqdm(range(r.steps), desc="artifact head", mininterval=5, disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(fn), (min(r.batch, len(fn)),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net.head(fn[idx]).squeeze(-1), y[idx])
        for g in opt.param_groups:
            g["lr"] = r.lr * 0.5 * (1 + np.cos(np.pi * step / max(r.steps, 1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    net.eval()
    out = Path(out)
    net.save_pretrained(out)
    with torch.no_grad():
        train_loss = F.binary_cross_entropy_with_logits(net.head(fn).squeeze(-1), y).item()
    report = {"recipe": dataclasses.asdict(r), "train_loss": round(train_loss, 4),
              "first_loss": round(losses[0], 4) if losses else None,
              "trainable_parameters": sum(p.numel() for p in net.head.parameters()),
              "torch": torch.__version__}
    if evaluate_after:
        report["heldout"] = evaluate(net, r.n_eval, seed=r.seed + 777)
    report["minutes"] = round((time.time() - t0) / 60, 2)
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    report["losses"] = losses
    report["model"] = net
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (e.g. rewards/assets/artifact)")
    p.add_argument("--steps", type=int, default=ArtifactRecipe.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=ArtifactRecipe.n_train)
    p.add_argument("--n-eval", type=int, default=ArtifactRecipe.n_eval)
    a = p.parse_args(argv)
    rep = train(a.out, ArtifactRecipe(seed=a.seed, steps=a.steps, n_train=a.n_train, n_eval=a.n_eval))
    rep.pop("losses")
    rep.pop("model")
    print(json.dumps({k: v for k, v in rep.items() if k != "recipe"}))


if __name__ == "__main__":
    main()
