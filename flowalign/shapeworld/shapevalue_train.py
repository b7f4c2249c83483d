"""Train ``shapevalue``: a small differentiable ShapeWorld reward *and value model*, distilled from the training
judge (version 2, ``detector_v2``) on the shipped model's own rollouts over **training prompts only**.

    python -m flowalign.shapeworld.shapevalue_train data --out runs/shapevalue/data --rollouts 3000 --seed 0
    python -m flowalign.shapeworld.shapevalue_train train --data runs/shapevalue/data --out rewards/assets/shapevalue \
        --steps 3000 --seed 0
    python -m flowalign.shapeworld.shapevalue_train evaluate --weights rewards/assets/shapevalue --per-task 50

What it predicts. For a prompt and an image that is either a final sample or the predicted clean image
x̂0 = x − σ·v at an intermediate step k of a rollout, the probability that **the rollout's final image** passes the
training judge v2's strict verdict (plus its lenient verdict and strict partial credit, the per-clause fraction,
as auxiliary heads). On a final image that is a distilled judge; on a blurry x̂0 it is a value: the expected final
verdict from there, which is what FK steering's potential needs.

- Data (``data``): rollouts of the shipped model (CFG 3, 20 steps) on ``shapeworld:train`` prompts (round-robin
  over tasks, so every task is equally represented), from named seed streams (``seeding``: "shapevalue/...") that
  no benchmark uses. Half the rollouts are the deterministic ODE sampler (best-of-N's and ReNO's final sampler),
  half FK's sampler (ODE until step 4, then the flow SDE with noise level 0.7 until step 18). x̂0 is decoded at
  steps ``RECORD_AT`` and the final image is kept; only the final image is judged (v2 lenient and strict, partial
  credit; the held-out judge is never computed here). Every rollout is also judged against one *counterfactual*
  training prompt (a hard negative: the same scene's prompt with one attribute changed, kept only if it is itself
  a training prompt), so the model must read the image, not the prompt's base rate.
- Model: a FiLM-conditioned CNN (4 conv blocks with coordinate channels, each modulated by an embedding of the
  prompt's GenEval metadata: task, shapes, colours, count, relation), a flattened 4x4 map + the embedding -> MLP ->
  3 logits. About 0.2 M parameters; weights ``model.pt`` + ``config.json`` (< 1 MB).
- Training: BCE on the three targets (strict verdict weight 1, lenient 0.5, partial credit 0.5), AdamW, linear
  warm-up then cosine decay, a fixed seed and step count; light jitter (1 px shifts, brightness) on the images.
- Held-out measurement (``evaluate``): fresh rollouts on ``shapeworld:test`` prompts (other seeds), per step: the
  accuracy / AUC of the predicted final strict verdict against the training judge v2's final verdict, beside two
  baselines that read the same x̂0 (the exact training judge itself, shapeclip's score) and the agreement of its
  final-image verdict with the held-out strict judge (a measurement only: the held-out judge is never a target).
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
from torch import nn

from .world import COLORS, NUMBERS, RELATIONS, SHAPES, TASKS

RECORD_AT = (2, 4, 6, 8, 10, 12, 14, 16)  # x̂0 steps kept per rollout (+ the final image, step = num_steps)
COLOR_NAMES = tuple(COLORS)
COUNTS = (1,) + tuple(NUMBERS)
HEADS = ("strict", "lenient", "partial")
META_DIM = 6 + (4 + 7 + 4) + (1 + 4 + 7 + 5)


# ------------------------------------------------------------------------------------------ prompt encoding
def _onehot(n: int, i: int | None) -> list[float]:
    v = [0.0] * n
    if i is not None:
        v[i] = 1.0
    return v


def encode_meta(meta: dict) -> list[float]:
    """GenEval metadata -> a fixed vector: task (6); entry 0: shape (4), colour (6 + none), count (1-4); entry 1:
    present, shape, colour (6 + none), relation to entry 0 (4 + none)."""
    if meta.get("tag") not in TASKS:
        raise ValueError(f"not a ShapeWorld task: {meta.get('tag')!r}")
    inc = meta["include"]
    e0 = inc[0]
    v = _onehot(6, TASKS.index(meta["tag"]))
    v += _onehot(4, SHAPES.index(e0["class"]))
    v += _onehot(7, COLOR_NAMES.index(e0["color"]) if e0.get("color") else 6)
    v += _onehot(4, COUNTS.index(int(e0.get("count", 1))))
    if len(inc) > 1:
        e1 = inc[1]
        v += [1.0] + _onehot(4, SHAPES.index(e1["class"]))
        v += _onehot(7, COLOR_NAMES.index(e1["color"]) if e1.get("color") else 6)
        v += _onehot(5, RELATIONS.index(e1["position"][0]) if e1.get("position") else 4)
    else:
        v += [0.0] + [0.0] * 4 + _onehot(7, 6) + _onehot(5, 4)
    return v


# ------------------------------------------------------------------------------------------ model
@dataclass
class ShapeValueConfig:
    width: int = 32
    embed: int = 64
    hidden: int = 128
    size: int = 32


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, embed: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, cout)
        self.film = nn.Linear(embed, 2 * cout)

    def forward(self, x, e):
        g, b = self.film(e).chunk(2, -1)
        return F.silu(self.norm(self.conv(x)) * (1 + g[..., None, None]) + b[..., None, None])


class ShapeValueNet(nn.Module):
    """(images in [0,1] (B,3,32,32), metadata vectors (B, META_DIM)) -> logits (B, 3): strict, lenient, partial."""

    def __init__(self, cfg: ShapeValueConfig | None = None):
        super().__init__()
        self.cfg = c = cfg or ShapeValueConfig()
        w = c.width
        self.meta = nn.Sequential(nn.Linear(META_DIM, c.embed), nn.SiLU(), nn.Linear(c.embed, c.embed))
        self.blocks = nn.ModuleList([_Block(5, w, 1, c.embed), _Block(w, 2 * w, 2, c.embed),
                                     _Block(2 * w, 2 * w, 2, c.embed), _Block(2 * w, 2 * w, 2, c.embed)])
        side = c.size // 8
        self.head = nn.Sequential(nn.Linear(2 * w * side * side + c.embed, c.hidden), nn.SiLU(),
                                  nn.Linear(c.hidden, len(HEADS)))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, c.size), torch.linspace(-1, 1, c.size), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def forward(self, images01: torch.Tensor, meta_vec: torch.Tensor) -> torch.Tensor:
        x = (images01 - 0.5) / 0.5
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1)
        e = self.meta(meta_vec)
        for blk in self.blocks:
            x = blk(x, e)
        return self.head(torch.cat([x.flatten(1), e], 1))


def save(model: ShapeValueNet, out, report: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    (out / "config.json").write_text(json.dumps({"model": "shapevalue", **dataclasses.asdict(model.cfg),
                                                 "heads": list(HEADS), "meta_dim": META_DIM}, indent=1))
    if report is not None:
        (out / "training_report.json").write_text(json.dumps(report, indent=1))
    return out


def load(path) -> ShapeValueNet:
    d = Path(path)
    cfg = json.loads((d / "config.json").read_text())
    model = ShapeValueNet(ShapeValueConfig(**{k: cfg[k] for k in ("width", "embed", "hidden", "size")}))
    model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


# ------------------------------------------------------------------------------------------ rollouts
def training_metadata() -> list[dict]:
    from flowalign.eval.benchmark import resolve_prompts
    from flowalign.eval.geneval import load_metadata

    return load_metadata(resolve_prompts("shapeworld:train"))


def round_robin(metas: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n records, tasks in turn, prompts within a task drawn at random."""
    by: dict[str, list[dict]] = {}
    for m in metas:
        by.setdefault(m["tag"], []).append(m)
    tasks = [t for t in TASKS if t in by]
    return [rng.choice(by[tasks[i % len(tasks)]]) for i in range(n)]


@torch.no_grad()
def rollouts(adapter, metas: list[dict], seed: int, sde: list[bool], guidance: float = 3.0, num_steps: int = 20,
             record_at=RECORD_AT, noise_level: float = 0.7, sde_from: int = 4, batch: int = 100,
             stream: str = "shapevalue") -> dict:
    """Sample every record (ODE, or FK's sampler where ``sde``); x̂0 (uint8) at ``record_at`` and the final image.
    Record i starts from ``seeding.generator(seed, stream + "/noise", i)``."""
    from flowalign import samplers, seeding
    from flowalign.rewards import to_uint8

    sig = adapter.schedule(num_steps)
    xs, finals = [], []
    for s in range(0, len(metas), batch):
        m = metas[s:s + batch]
        idx = range(s, s + len(m))
        cond = adapter.encode([r["prompt"] for r in m], negative="" if guidance > 1 else None)
        x = torch.cat([adapter.init_noise(1, seeding.generator(seed, stream + "/noise", i)) for i in idx])
        gens = [seeding.generator(seed, stream + "/sde", i) for i in idx]
        use = torch.tensor([bool(sde[i]) for i in idx])
        rec = []
        for i in range(num_steps):
            v = adapter.predict(x, sig[i], cond, guidance)
            if i in record_at:
                rec.append(to_uint8(adapter.decode(x - sig[i] * v)))
            nxt = samplers.ode_step(x, v, sig[i], sig[i + 1]).next
            if sde_from <= i <= num_steps - 2 and use.any():
                noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens])
                st = samplers.flow_sde_step(x, v, sig[i], sig[i + 1], noise_level, sigma_cap=float(sig[1]),
                                            noise=noise).next
                nxt = torch.where(use.view(-1, 1, 1, 1), st, nxt)
            x = nxt
        finals.append(to_uint8(adapter.decode(x)))
        xs.append(np.stack(rec, 1))
    return {"x0": np.concatenate(xs), "final": np.concatenate(finals), "record_at": list(record_at)}


def judge_v2(meta: dict, dets) -> tuple[float, float, float]:
    from flowalign.eval.geneval import judge

    strict, partial = judge(meta, dets, strict=True)
    lenient, _ = judge(meta, dets)
    return float(strict), float(lenient), float(partial)


def counterfactual(meta: dict, known: dict[str, dict], rng: random.Random) -> dict | None:
    from .shapeclip_train import hard_negatives

    c = [known[h["prompt"]] for h in hard_negatives(meta) if h["prompt"] in known]
    return rng.choice(c) if c else None


def make_data(out, n_rollouts: int = 3000, seed: int = 0, guidance: float = 3.0, num_steps: int = 20,
              model="shapeworld", progress: bool = True) -> dict:
    from flowalign.pipelines.base import load_adapter
    from flowalign.trainer import resolve_model_path

    from . import detector_v2

    t0 = time.time()
    rng = random.Random(seed)
    train = training_metadata()
    known = {m["prompt"]: m for m in train}
    metas = round_robin(train, n_rollouts, rng)
    sde = [i % 2 == 1 for i in range(n_rollouts)]
    adapter = load_adapter(resolve_model_path(model))
    r = rollouts(adapter, metas, seed, sde, guidance, num_steps)
    labels, cf_labels, cf_meta = [], [], []
    for m, img in zip(metas, r["final"]):
        d = detector_v2.detect(img)
        labels.append(judge_v2(m, d))
        c = counterfactual(m, known, rng)
        cf_meta.append(c["prompt"] if c else "")
        cf_labels.append(judge_v2(c, d) if c else (float("nan"),) * 3)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "rollouts.npz", x0=r["x0"], final=r["final"], labels=np.array(labels, np.float32),
                        cf_labels=np.array(cf_labels, np.float32), sde=np.array(sde))
    info = {"prompts": [m["prompt"] for m in metas], "cf_prompts": cf_meta, "record_at": r["record_at"],
            "seed": seed, "n_rollouts": n_rollouts, "guidance": guidance, "num_steps": num_steps,
            "split": "shapeworld:train", "judge": "training judge v2 (detector_v2): strict, lenient, partial (strict)",
            "strict_rate": float(np.mean([x[0] for x in labels])), "minutes": round((time.time() - t0) / 60, 2)}
    (out / "info.json").write_text(json.dumps(info))
    if progress:
        print(json.dumps({k: info[k] for k in ("n_rollouts", "strict_rate", "minutes")}), flush=True)
    return info


# ------------------------------------------------------------------------------------------ training
@dataclass
class ShapeValueRecipe:
    seed: int = 0
    steps: int = 3000
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    head_weights: tuple = (1.0, 0.5, 0.5)
    final_share: float = 0.3     # fraction of each batch that are final images (the rest x̂0 at a recorded step)
    counterfactual_share: float = 0.25
    holdout: float = 0.1         # fraction of rollouts kept out of training for a validation loss


def load_data(d) -> tuple[dict, dict]:
    d = Path(d)
    z = np.load(d / "rollouts.npz")
    return {k: z[k] for k in z.files}, json.loads((d / "info.json").read_text())


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (B,), generator=gen), torch.randint(0, 3, (B,), generator=gen)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]] for i in range(B)])
    return (x + 0.04 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5)).clamp(0, 1)


def train(data_dirs, out, recipe: ShapeValueRecipe | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    r = recipe or ShapeValueRecipe()
    t0 = time.time()
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed + 1)
    # pool every data directory
    X0, FIN, LAB, CF, PM, CFM, INFO = [], [], [], [], [], [], []
    for dd in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs):
        z, info = load_data(dd)
        X0.append(z["x0"])
        FIN.append(z["final"])
        LAB.append(z["labels"])
        CF.append(z["cf_labels"])
        PM += info["prompts"]
        CFM += info["cf_prompts"]
        INFO.append({k: info[k] for k in ("split", "seed", "n_rollouts", "judge", "strict_rate", "record_at")})
    x0, fin = np.concatenate(X0), np.concatenate(FIN)
    lab, cf = torch.from_numpy(np.concatenate(LAB)), torch.from_numpy(np.concatenate(CF))
    known = {m["prompt"]: m for m in training_metadata()}
    mv = torch.tensor([encode_meta(known[p]) for p in PM])
    cfv = torch.tensor([encode_meta(known[p]) if p else [0.0] * META_DIM for p in CFM])
    has_cf = torch.tensor([bool(p) for p in CFM])
    N, S = x0.shape[0], x0.shape[1]
    perm = torch.randperm(N, generator=gen)
    n_val = int(round(N * r.holdout))
    val, tr = perm[:n_val], perm[n_val:]
    model = ShapeValueNet()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    hw = torch.tensor(r.head_weights)

    def images(rows, steps):
        a = np.where((steps == S)[:, None, None, None], fin[rows], x0[rows, np.minimum(steps, S - 1)])
        return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255

    def sample(pool, n, g):
        rows = pool[torch.randint(0, len(pool), (n,), generator=g)].numpy()
        steps = torch.randint(0, S, (n,), generator=g)
        steps[torch.rand(n, generator=g) < r.final_share] = S
        steps = steps.numpy()
        use_cf = (torch.rand(n, generator=g) < r.counterfactual_share) & has_cf[rows]
        m = torch.where(use_cf[:, None], cfv[rows], mv[rows])
        y = torch.where(use_cf[:, None], cf[rows], lab[rows])
        return images(rows, steps), m, y

    def loss_of(logits, y):
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        return (per * hw).sum() / hw.sum()

    vgen = torch.Generator().manual_seed(r.seed + 2)
    vx, vm, vy = sample(val, min(2048, 8 * len(val)), vgen) if n_val else (None, None, None)
    losses = []
    bar = tqdm(range(r.steps), desc="shapevalue", mininterval=5, disable=not progress)
    for step in bar:
        x, m, y = sample(tr, r.batch, gen)
        loss = loss_of(model(_jitter(x, gen), m), y)
        lr = r.lr * min(1.0, (step + 1) / r.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / r.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.3f}")
    model.eval()
    rep = {"recipe": dataclasses.asdict(r), "rollouts": N, "train_rollouts": len(tr), "val_rollouts": n_val,
           "train_loss_first100": round(float(np.mean(losses[:100])), 4),
           "train_loss_last100": round(float(np.mean(losses[-100:])), 4),
           "parameters": sum(p.numel() for p in model.parameters()), "data": [str(d) for d in
                                                                              ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)],
           "data_info": INFO}
    if n_val:
        with torch.no_grad():
            lg = model(vx, vm)
        rep["val_loss"] = round(loss_of(lg, vy).item(), 4)
        rep["val_strict_accuracy"] = round(float(((lg[:, 0] > 0).float() == vy[:, 0]).float().mean()), 4)
        rep["val_strict_base_rate"] = round(float(vy[:, 0].mean()), 4)
    rep["minutes"] = round((time.time() - t0) / 60, 2)
    save(model, out, rep)
    return rep


# ------------------------------------------------------------------------------------------ evaluation
def auc(score, y) -> float:
    score, y = np.asarray(score, float), np.asarray(y, bool)
    if y.all() or (~y).all():
        return float("nan")
    from scipy.stats import rankdata

    rk = rankdata(score)
    n1 = y.sum()
    return float((rk[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (~y).sum()))


def evaluate(weights, per_task: int = 50, seed: int = 31_000, split: str = "test", model="shapeworld",
             guidance: float = 3.0, num_steps: int = 20) -> dict:
    """Held-out rollouts (``shapeworld:<split>`` prompts, half ODE half FK's sampler, seeds of their own): per
    recorded step, the accuracy and AUC of shapevalue's predicted final strict verdict against the training judge
    v2's verdict on the final image, beside the exact judge and shapeclip reading the same x̂0; on final images
    also the agreement with the held-out strict judge (a measurement, never a target)."""
    from flowalign.eval.benchmark import resolve_prompts, subsample
    from flowalign.eval.geneval import judge, load_metadata
    from flowalign.pipelines.base import load_adapter
    from flowalign.rewards import build_reward
    from flowalign.trainer import resolve_model_path

    from . import detector_v2, geometry_judge

    metas = subsample(load_metadata(resolve_prompts(f"shapeworld:{split}")), per_task)
    sde = [i % 2 == 1 for i in range(len(metas))]
    adapter = load_adapter(resolve_model_path(model))
    r = rollouts(adapter, metas, seed, sde, guidance, num_steps, stream="shapevalue-eval")
    y, held = [], []
    for m, img in zip(metas, r["final"]):
        y.append(judge_v2(m, detector_v2.detect(img)))
        held.append(float(judge(m, geometry_judge.detect(img), strict=True)[0]))
    y, held = np.array(y), np.array(held)
    sv = build_reward("shapevalue", path=weights)
    sc = build_reward("shapeclip")
    prompts = [m["prompt"] for m in metas]
    tags = [m["tag"] for m in metas]
    steps = list(r["record_at"]) + [num_steps]
    out = {"split": split, "n": len(metas), "per_task": per_task, "seed": seed,
           "final_strict_rate": float(y[:, 0].mean()), "per_step": {}}
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    for k, step in enumerate(steps):
        ims = r["x0"][:, k] if step != num_steps else r["final"]
        p = sv(to_t(ims), prompts, metas)["reward"].numpy()
        j = np.array([judge_v2(m, detector_v2.detect(im)) for m, im in zip(metas, ims)])
        c = sc(to_t(ims), prompts)["reward"].numpy()
        row = {"shapevalue_accuracy": float(((p > 0.5) == (y[:, 0] > 0.5)).mean()),
               "shapevalue_auc": auc(p, y[:, 0]),
               "judge_on_x0_accuracy": float((j[:, 0] == y[:, 0]).mean()),
               "judge_on_x0_auc": auc(j[:, 2] + 1e-3 * j[:, 0], y[:, 0]),
               "shapeclip_auc": auc(c, y[:, 0]),
               "majority_accuracy": float(max(y[:, 0].mean(), 1 - y[:, 0].mean())),
               "shapevalue_accuracy_per_task": {t: float(np.mean([(pp > 0.5) == (yy > 0.5) for pp, yy, tt in
                                                                    zip(p, y[:, 0], tags) if tt == t]))
                                                for t in TASKS}}
        if step == num_steps:
            row["heldout_strict_agreement"] = float(((p > 0.5) == (held > 0.5)).mean())
            row["train_v2_strict_vs_heldout_strict_agreement"] = float(((y[:, 0] > 0.5) == (held > 0.5)).mean())
            row["shapevalue_auc_vs_heldout_strict"] = auc(p, held)
            row["shapeclip_auc_vs_heldout_strict"] = auc(c, held)
        out["per_step"][str(step)] = row
    return out


def format_eval(ev: dict) -> str:
    lines = [f"shapevalue on {ev['n']} held-out rollouts (shapeworld:{ev['split']}, {ev['per_task']} per task, seed "
             f"{ev['seed']}, half ODE half FK's sampler); target: the final image's training-judge v2 strict verdict "
             f"(rate {ev['final_strict_rate']:.3f}).", "",
             "| image read | shapevalue acc | shapevalue AUC | exact judge on it: acc | exact judge AUC | shapeclip AUC "
             "| majority acc |", "|---|---|---|---|---|---|---|"]
    for s, row in ev["per_step"].items():
        name = "final image" if s == max(ev["per_step"], key=int) else f"x̂0 at step {s}"
        lines.append(f"| {name} | {row['shapevalue_accuracy']:.3f} | {row['shapevalue_auc']:.3f} | "
                     f"{row['judge_on_x0_accuracy']:.3f} | {row['judge_on_x0_auc']:.3f} | {row['shapeclip_auc']:.3f} | "
                     f"{row['majority_accuracy']:.3f} |")
    last = ev["per_step"][max(ev["per_step"], key=int)]
    lines += ["", "Final images, per task (shapevalue accuracy vs the training judge v2 strict): "
              + ", ".join(f"{t} {v:.2f}" for t, v in last["shapevalue_accuracy_per_task"].items()),
              f"Agreement with the held-out strict judge on final images (measurement only): shapevalue "
              f"{last['heldout_strict_agreement']:.3f} (the training judge v2 strict itself "
              f"{last['train_v2_strict_vs_heldout_strict_agreement']:.3f}); AUC vs held-out strict: shapevalue "
              f"{last['shapevalue_auc_vs_heldout_strict']:.3f}, shapeclip {last['shapeclip_auc_vs_heldout_strict']:.3f}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="rollouts on training prompts, judged by the training judge v2")
    d.add_argument("--out", required=True)
    d.add_argument("--rollouts", type=int, default=3000)
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True, help="comma-separated data directories")
    t.add_argument("--out", required=True, help="e.g. rewards/assets/shapevalue")
    t.add_argument("--steps", type=int, default=ShapeValueRecipe.steps)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=ShapeValueRecipe.batch)
    t.add_argument("--lr", type=float, default=ShapeValueRecipe.lr)
    e = sub.add_parser("evaluate", help="held-out accuracy on test prompts' rollouts")
    e.add_argument("--weights", default=None)
    e.add_argument("--per-task", type=int, default=50)
    e.add_argument("--split", default="test", choices=("test", "test_unseen"))
    e.add_argument("--seed", type=int, default=31_000)
    e.add_argument("--out", default=None, help="write eval.json / eval.md here (default: the weights directory)")
    a = p.parse_args(argv)
    if a.cmd == "data":
        make_data(a.out, a.rollouts, a.seed)
    elif a.cmd == "train":
        rep = train(a.data.split(","), a.out, ShapeValueRecipe(seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr))
        print(json.dumps(rep))
    else:
        from flowalign.rewards.shapevalue import DEFAULT_PATH

        w = Path(a.weights) if a.weights else DEFAULT_PATH
        ev = evaluate(w, a.per_task, a.seed, a.split)
        md = format_eval(ev)
        o = Path(a.out) if a.out else w
        o.mkdir(parents=True, exist_ok=True)
        (o / f"eval_{a.split}.json").write_text(json.dumps(ev, indent=1))
        (o / f"eval_{a.split}.md").write_text(md + "\n")
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
