"""DRAGON (Bai et al. 2025): distributional rewards optimised by contrasting on-policy positives and negatives.

Each iteration the current policy rolls out (ODE, clean samples only) and the reward scores the generations: any
instance reward, an instance-to-distribution one (``exemplar``: similarity to an exemplar set) or a
distribution-to-distribution one (``frechet``: each image's marginal effect on the batch's Frechet distance to the
exemplars; ``vendi``: on its group's diversity) -- see ``rewards/exemplar.py``. Within each prompt group the top
``set_fraction`` by reward form the positive set D+ and the bottom ones the negative set D- (groups whose rewards
are all equal give none). The contrast is made against the frozen reference on the flow-matching error at a
shared noise level t and noise eps, x_t = (1 - t) x0 + t eps, target velocity eps - x0:

    d(x) = ||v_theta(x_t) - (eps - x0)||^2 - ||v_ref(x_t) - (eps - x0)||^2        (mean over latent elements)

- ``loss: dpo`` (Diffusion-DPO on the flow objective): positives and negatives of a group are paired in rank order
  (best with worst, ...), sharing t and eps, and  L = -log sigmoid(-beta (d(x+) - d(x-)));
- ``loss: kto`` (unpaired, Diffusion-KTO style): with the implied reward u = -beta d(x) and the reference point
  z = max(0, mean u) (detached),  L = 1 - sigmoid(u - z) for x in D+,  1 - sigmoid(z - u) for x in D-.

Velocities are taken at the rollout's CFG scale (what is trained is what is sampled, as in ``nft``). With several
processes every process trains the same number of rows: each pads its sets with weight-0 rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .base import Algorithm, RolloutSpec, Work
from .forward import check_time_cfg, noised, sample_times


def contrast_sets(adv: torch.Tensor, groups: torch.Tensor, fraction: float) -> tuple[list[int], list[int]]:
    """Per group (rank order): its top and bottom ``fraction`` (at least one each) by advantage; none for a group
    whose advantages are all equal. Positive i and negative i are the i-th best and the i-th worst."""
    pos, neg = [], []
    for g in torch.unique(groups):
        m = (groups == g).nonzero().view(-1)
        a = adv[m.to(adv.device)].float().cpu()
        if len(m) < 2 or float(a.max() - a.min()) < 1e-12:
            continue
        k = max(1, min(len(m) // 2, round(fraction * len(m))))
        order = torch.argsort(a, descending=True, stable=True)
        pos += m[order[:k]].tolist()
        neg += m[order.flip(0)[:k]].tolist()
    return pos, neg


def dpo_loss(d_pos: torch.Tensor, d_neg: torch.Tensor, beta: float, w: torch.Tensor):
    logits = -beta * (d_pos - d_neg)
    loss = (w * -F.logsigmoid(logits)).sum() / w.sum().clamp_min(1)
    with torch.no_grad():
        n = w.sum().clamp_min(1)
        stats = {"dpo_acc": float((w * (logits > 0).float()).sum() / n), "dpo_margin": float((w * logits).sum() / n)}
    return loss, stats


def kto_loss(d: torch.Tensor, label: torch.Tensor, beta: float, w: torch.Tensor):
    """``label`` +1 for D+, -1 for D-."""
    u = -beta * d
    z = u.detach().mean().clamp_min(0)
    loss = (w * (1 - torch.sigmoid(label * (u - z)))).sum() / w.sum().clamp_min(1)
    with torch.no_grad():
        stats = {"kto_u_pos": float(u[label > 0].mean()) if (label > 0).any() else 0.0,
                 "kto_u_neg": float(u[label < 0].mean()) if (label < 0).any() else 0.0, "kto_z": float(z)}
    return loss, stats


@dataclass
class DragonConfig:
    name: Literal["dragon"] = "dragon"
    loss: Literal["dpo", "kto"] = "dpo"
    beta: float = 500.0                # contrast temperature on the per-element flow-matching error difference
    set_fraction: float = 0.25         # top / bottom share of each group forming D+ / D-
    adv_clip: float = 5.0
    global_std: bool = False
    t_draws: int = 2                   # noise levels per row per iteration (one backward each)
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    t_range: list = field(default_factory=lambda: [0.0, 1.0])

    def validate(self, err) -> None:
        if not self.beta > 0:
            err("algorithm.beta", f"must be > 0, got {self.beta}")
        if not 0 < self.set_fraction <= 0.5:
            err("algorithm.set_fraction", f"must be in (0, 0.5], got {self.set_fraction}")
        if not self.adv_clip > 0:
            err("algorithm.adv_clip", f"must be > 0, got {self.adv_clip}")
        check_time_cfg(self, err)


class Dragon(Algorithm):
    name = "dragon"
    Config = DragonConfig
    stochastic = False

    def policies(self):
        return ("reference",)

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic=False)

    def plan(self, traj, adv, it, gen) -> Work:
        c = self.cfg
        groups = traj.groups if traj.groups is not None else torch.zeros(len(traj), dtype=torch.long)
        pos, neg = contrast_sets(adv, groups, c.set_fraction)
        w = [1.0] * len(pos)
        if self.ctx.world > 1:  # the same number of rows on every process: pad with weight-0 rows
            cap = len(traj) // 2
            pos, neg, w = pos[:cap], neg[:cap], w[:cap]
            pad = cap - len(pos)
            pos, neg, w = pos + [0] * pad, neg + [0] * pad, w + [0.0] * pad
        if c.loss == "dpo":  # rows [w_1, l_1, w_2, l_2, ...], a pair in one micro-batch
            rows = [i for pair in zip(pos, neg) for i in pair]
            label = [1.0, -1.0] * len(pos)
            weight = [x for x in w for _ in (0, 1)]
            unit = 2
        else:
            rows, label, weight, unit = pos + neg, [1.0] * len(pos) + [-1.0] * len(neg), w + w, 1
        n = len(rows)
        x0 = traj.latents[:, -1]
        t = sample_times(max(n // unit, 1), c.t_draws, gen, c.t_sampling, tuple(c.t_range))
        eps = torch.randn((max(n // unit, 1), c.t_draws, *x0.shape[1:]), generator=gen)
        if n == 0:
            return Work(traj, adv, torch.zeros(0, dtype=torch.long))
        idx = torch.tensor(rows, dtype=torch.long)
        work = Work(traj, adv, torch.arange(n)).index(idx)
        rep = torch.arange(n) // unit   # the two rows of a pair share t and eps
        work.extra = {"t": t[rep].to(x0.device), "eps": eps[rep].to(x0), "label": torch.tensor(label),
                      "w": torch.tensor(weight)}
        work.unit = unit
        return work

    def parts(self, work: Work) -> list:
        return list(range(self.cfg.t_draws))

    def loss(self, fwd, work: Work, k: int):
        c, tr = self.cfg, work.traj
        x0, t, eps = tr.latents[:, -1], work.extra["t"][:, k], work.extra["eps"][:, k]
        x_t = noised(x0, t, eps)
        target = eps - x0
        dims = tuple(range(1, x0.ndim))
        err = (fwd.predict(x_t, t, tr.cond, tr.guidance) - target).pow(2).mean(dims)
        ref = (fwd.predict(x_t, t, tr.cond, tr.guidance, policy="reference") - target).pow(2).mean(dims)
        d = err - ref
        w = work.extra["w"].to(d)
        if c.loss == "dpo":
            dd, ww = d.view(-1, 2), w.view(-1, 2)[:, 0]
            loss, stats = dpo_loss(dd[:, 0], dd[:, 1], c.beta, ww)
        else:
            loss, stats = kto_loss(d, work.extra["label"].to(d), c.beta, w)
        stats["policy_loss"] = loss.item()
        stats["fm_err"] = float(err.detach().mean())
        return loss / c.t_draws, stats
