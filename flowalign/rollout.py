"""The rollout engine and its currency, the Trajectory.

``rollout`` runs an adapter from x_T to x_0, stochastic (flow SDE) on the chosen steps and deterministic (ODE)
elsewhere, and stores every latent and per-step log-prob. ``replay_step`` scores one stored transition under the
current weights through the very same ``adapter.step`` call, which is why the on-policy ratio is exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from flowalign.pipelines.base import Cond


@dataclass
class Trajectory:
    prompts: list[str]
    cond: Cond
    latents: torch.Tensor     # (B, T+1, C, H, W): x_T ... x_0
    log_probs: torch.Tensor   # (B, T): log p of each stored transition (0 on ODE steps)
    sde_mask: torch.Tensor    # (T,) bool: which steps were stochastic, or (B, T) when it differs per sample (branching)
    sigmas: torch.Tensor      # (T+1,)
    guidance: float
    noise_level: float
    metadata: list | None = None
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    noise_block: int = 1                # SDE noise in f x f block-constant latents (see samplers.flow_sde_step)
    groups: torch.Tensor | None = None  # (B,) prompt-group id of each sample (set by the trainer), for pairing

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def index(self, idx) -> "Trajectory":
        idx = torch.as_tensor(idx).long().view(-1)
        keep = idx.tolist()
        vals = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("prompts", "metadata"):
                vals[f.name] = None if v is None else [v[j] for j in keep]
            elif f.name == "cond":
                vals[f.name] = v.index(idx)
            elif f.name in ("latents", "log_probs", "images", "groups") or (f.name == "sde_mask" and v.ndim == 2):
                vals[f.name] = None if v is None else v[idx]
            else:
                vals[f.name] = v
        return Trajectory(**vals)

    @staticmethod
    def cat(trajs: list["Trajectory"]) -> "Trajectory":
        t0 = trajs[0]
        return Trajectory(
            prompts=[p for t in trajs for p in t.prompts], cond=Cond.cat([t.cond for t in trajs]),
            latents=torch.cat([t.latents for t in trajs]), log_probs=torch.cat([t.log_probs for t in trajs]),
            sde_mask=torch.cat([t.sde_mask for t in trajs]) if t0.sde_mask.ndim == 2 else t0.sde_mask,
            sigmas=t0.sigmas, guidance=t0.guidance, noise_level=t0.noise_level, noise_block=t0.noise_block,
            metadata=None if t0.metadata is None else [m for t in trajs for m in t.metadata],
            images=None if t0.images is None else torch.cat([t.images for t in trajs]),
            groups=None if t0.groups is None else torch.cat([t.groups for t in trajs]))


def sde_mask(num_steps: int, spec: str | list[int] = "all_but_last") -> torch.Tensor:
    """Which steps are stochastic. spec: 'all', 'all_but_last' (flow_grpo), 'first:K', or a list of indices."""
    m = torch.zeros(num_steps, dtype=torch.bool)
    if isinstance(spec, (list, tuple)):
        for i in spec:
            if not 0 <= int(i) < num_steps:
                raise ValueError(f"sde step {i} out of range for {num_steps} steps")
            m[int(i)] = True
    elif spec == "all":
        m[:] = True
    elif spec == "all_but_last":
        m[:-1] = True
    elif isinstance(spec, str) and spec.startswith("first:"):
        m[: int(spec.split(":")[1])] = True
    else:
        raise ValueError(f"bad sde step spec {spec!r}: use 'all', 'all_but_last', 'first:K' or a list of indices")
    return m


def trained_steps(mask: torch.Tensor, spec: str = "sde") -> list[int]:
    """The stochastic steps a run trains (and, with branching, branches at): all of ``mask``'s ('sde') or the
    first K of them ('first:K')."""
    pool = mask.nonzero().view(-1).tolist()
    return pool[: int(spec[6:])] if spec.startswith("first:") else pool


def step_column(mask: torch.Tensor, i: int, batch: int) -> torch.Tensor:
    """(B,) bool: which samples are stochastic at step i, for a (T,) or per-sample (B, T) mask."""
    return mask[:, i] if mask.ndim == 2 else mask[i].expand(batch)


def step_rows(mask: torch.Tensor, i: int, batch: int) -> torch.Tensor:
    """Indices of the samples that are stochastic at step i."""
    return step_column(mask, i, batch).nonzero().view(-1)


@torch.no_grad()
def rollout(adapter, cond: Cond, sigmas: torch.Tensor, guidance: float, noise_level: float,
            mask: torch.Tensor, x: torch.Tensor | None = None, generator: torch.Generator | None = None,
            prompts: list[str] | None = None, metadata=None, decode: bool = True, kernel: str = "sde",
            noise_block: int = 1, noises: torch.Tensor | None = None) -> Trajectory:
    """Sample x_T -> x_0. ``mask`` (T,) marks the stochastic steps of every sample; a (B, T) mask gives each sample
    its own (TempFlow-style branching: a group shares x_T and the ODE path up to its one stochastic step). On a step
    where only some samples are stochastic, the two subsets go through the model separately. ``noises``
    (B, T, C, H, W), when given, is the SDE noise of every step (e.g. antithetic pairs); otherwise it is drawn from
    ``generator``."""
    B = len(cond)
    if x is None:
        x = adapter.init_noise(B, generator)
    xs, lps = [x], []
    for i in range(sigmas.numel() - 1):
        col = step_column(mask, i, B)
        rows = col.nonzero().view(-1)
        noise = None
        if len(rows):
            # drawn where the generator lives (a CPU generator cannot draw on CUDA), then moved
            noise = noises[:, i].to(x.device, torch.float32) if noises is not None else \
                torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device).to(x.device)
        lp = torch.zeros(B, device=x.device)
        if len(rows) == B:
            out = adapter.step(x, sigmas, i, cond, guidance, noise_level, noise=noise, kernel=kernel,
                               noise_block=noise_block)
            x, lp = out.next, out.log_prob.float()
        elif len(rows) == 0:
            x = adapter.step(x, sigmas, i, cond, guidance, 0.0).next
        else:
            ode = (~col).nonzero().view(-1)
            sde = adapter.step(x[rows], sigmas, i, cond.index(rows), guidance, noise_level, noise=noise[rows],
                               kernel=kernel, noise_block=noise_block)
            x = x.clone()
            x[ode] = adapter.step(x[ode], sigmas, i, cond.index(ode), guidance, 0.0).next
            x[rows] = sde.next
            lp[rows] = sde.log_prob.float()
        xs.append(x)
        lps.append(lp)
    images = adapter.decode(x) if decode else None
    return Trajectory(prompts=list(prompts) if prompts is not None else [""] * B, cond=cond,
                      latents=torch.stack(xs, 1), log_probs=torch.stack(lps, 1), sde_mask=mask.clone(),
                      sigmas=sigmas, guidance=guidance, noise_level=noise_level, metadata=metadata, images=images,
                      noise_block=noise_block)


def replay_step(adapter, traj: Trajectory, i: int, kernel: str = "sde", **kw):
    """Score transition i of the stored trajectories under the adapter's current weights (with gradients).
    ``adapter`` is an adapter or an ``algorithms.base.Forward``; ``kw`` go to its ``step`` (``module``,
    ``cfg_grad``, or a Forward's ``policy``)."""
    return adapter.step(traj.latents[:, i], traj.sigmas, i, traj.cond, traj.guidance, traj.noise_level,
                        next_x=traj.latents[:, i + 1], kernel=kernel, noise_block=traj.noise_block, **kw)


@torch.no_grad()
def complete(adapter, traj: Trajectory, every: int) -> torch.Tensor:
    """G2RPO's coarser completions: from the latent after each sample's last stochastic step k, the ODE over the
    stored schedule's remaining sigmas taking every ``every``-th one (sigma_{k+1}, sigma_{k+1+every}, ..., always
    ending at sigma_T = 0); returns the decoded images. ``every = 1`` repeats the stored ODE tail exactly."""
    mask = traj.sde_mask if traj.sde_mask.ndim == 2 else traj.sde_mask.expand(len(traj), -1)
    T = traj.num_steps
    last = torch.where(mask.any(1), T - 1 - mask.flip(1).float().argmax(1), torch.full((len(traj),), -1))
    x0 = traj.latents[:, -1].clone()
    for k in torch.unique(last).tolist():
        rows = (last == k).nonzero().view(-1)
        idx = list(range(k + 1, T + 1, every))
        if idx[-1] != T:
            idx.append(T)
        sig = traj.sigmas[idx]
        x = traj.latents[rows, k + 1]
        cond = traj.cond.index(rows)
        for i in range(len(idx) - 1):
            x = adapter.step(x, sig, i, cond, traj.guidance, 0.0).next
        x0[rows] = x
    return adapter.decode(x0)


@torch.no_grad()
def sample_ode(adapter, cond: Cond, num_steps: int, guidance: float, x: torch.Tensor) -> torch.Tensor:
    """Deterministic sampling (evaluation): returns images in [0, 1]."""
    sigmas = adapter.schedule(num_steps)
    for i in range(num_steps):
        x = adapter.step(x, sigmas, i, cond, guidance, 0.0).next
    return adapter.decode(x)
