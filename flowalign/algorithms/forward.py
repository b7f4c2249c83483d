"""What the forward-process algorithms (DiffusionNFT, AWM) share: clean samples from ODE rollouts, re-noised at
sampled noise levels, x_t = (1 - t) x_0 + t eps (rectified flow), and a config block for how t is drawn."""
from __future__ import annotations

import torch

from .base import Work


def sample_times(n: int, draws: int, gen: torch.Generator, how: str = "logit_normal",
                 t_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """(n, draws) noise levels: logit-normal (sigmoid of a standard normal, SD3's training density) or uniform,
    then mapped affinely into t_range."""
    if how == "logit_normal":
        u = torch.sigmoid(torch.randn(n, draws, generator=gen))
    elif how == "uniform":
        u = torch.rand(n, draws, generator=gen)
    else:
        raise ValueError(f"unknown time sampling {how!r}: 'logit_normal' or 'uniform'")
    lo, hi = t_range
    return lo + (hi - lo) * u


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    t4 = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - t4) * x0 + t4 * eps


def velocity_draw(fwd, work: Work, k: int):
    """Draw k of every sample: (x0, t, eps, x_t, v_theta, v_old), the velocities at the rollout's CFG scale."""
    tr = work.traj
    x0, t, eps = tr.latents[:, -1], work.extra["t"][:, k], work.extra["eps"][:, k]
    x_t = noised(x0, t, eps)
    v = fwd.predict(x_t, t, tr.cond, tr.guidance)
    return x0, t, eps, x_t, v, fwd.predict(x_t, t, tr.cond, tr.guidance, policy="old")


def velocity_kl(fwd, work: Work, x_t, t, v, policy: str) -> torch.Tensor:
    """mean((v_theta - v_policy)^2): the velocity-MSE KL to a named policy (the reference, an EMA)."""
    return (v - fwd.predict(x_t, t, work.traj.cond, work.traj.guidance, policy=policy)).pow(2).mean()


def plan_noising(traj, adv, keep, draws: int, gen: torch.Generator, how: str, t_range) -> Work:
    """Work for a forward-process algorithm: per sample, ``draws`` noise levels and noises (drawn for the whole
    batch, so a sample's draws do not depend on which samples are kept or how they are batched)."""
    x0 = traj.latents[:, -1]
    t = sample_times(len(traj), draws, gen, how, t_range)
    eps = torch.randn((len(traj), draws, *x0.shape[1:]), generator=gen).to(x0)
    return Work(traj, adv, keep, extra={"t": t.to(x0.device), "eps": eps})


def check_time_cfg(c, err) -> None:
    if c.t_draws < 1:
        err("algorithm.t_draws", f"must be >= 1, got {c.t_draws}")
    lo, hi = (list(c.t_range) + [None, None])[:2] if isinstance(c.t_range, list) else (None, None)
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo < hi <= 1) \
            or len(c.t_range) != 2:
        err("algorithm.t_range", f"expected [lo, hi] with 0 <= lo < hi <= 1, got {c.t_range!r}")
