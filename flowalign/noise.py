"""Inference-time alignment: best-of-N, ReNO, CARINOX and FK steering behind one call, over the same adapter and
reward interfaces as training.

    res = optimize(adapter, prompts, rewards, method="reno", budget=None, seed=0, metadata=None,
                   guidance=3.0, num_steps=20, **options)

- ``rewards``: a ``Reward`` or a spec for ``rewards.build_rewards`` (``"shapeclip"``, ``{"shapeclip": 1,
  "artifact": 0.1}``, ...). Its ``"reward"`` output is maximised.
- ``budget``: transformer forwards per prompt (NFE, below); the method's count (candidates, iterations,
  particles) is derived from it unless given as an option. ``res.nfe`` is what was actually used.
- ``seed``: prompt ``indices[i]`` (default ``i``) starts from the noise of ``torch.Generator().manual_seed(seed +
  indices[i])``, the noise ``eval.benchmark.generate`` gives record i, so base sampling, every method and the
  evaluation share noises. Further candidates / particles and all SDE noise come from named streams
  (``seeding.generator(seed, name, index, ...)``): a prompt's result does not depend on its batch.

Methods (``METHODS``):

- ``best_of_n`` (``n``): n noises per prompt (the first is the base noise), each sampled with the full ODE
  sampler, scored by the reward; the best is kept. Any reward (no gradients).
- ``reno`` (``iterations`` 50, ``sampler_steps`` min(4, num_steps) (ReNO used 1 on one-step distilled models; for
  a multi-step flow model one Euler step from sigma = 1 gives the x_0 prediction at pure noise, which a
  well-trained model makes nearly independent of x_T; ``preview_sigmas``), ``lr`` 5, ``momentum`` 0.9 Nesterov,
  ``clip`` 0.1, ``prior`` "reno", ``prior_weight`` 0.01, ``checkpointing`` True): gradient ascent on x_T through a
  differentiable few-step ODE sampler (1-4 steps through ``adapter.predict``, gradients through
  ``adapter.decode(differentiable=True)``) on ``reward - prior_weight * prior(x_T)``, the gradient norm clipped
  per sample; every iterate (the first and the last included) is scored and the best one by reward is rendered
  with the full sampler (``num_steps``; ``final="preview"`` returns the few-step image instead). Needs a
  differentiable reward.
- ``carinox`` (``n_explore`` 8, ``top_k`` 2, ``iterations``, ``category_rewards``): exploration (n_explore
  noises scored on the few-step preview), ReNO from each prompt's top_k, the top_k results rendered with the
  full sampler and the best by reward kept. ``category_rewards`` maps a prompt category
  (``metadata[i][category_key]``, default the GenEval ``tag``) to its reward (``select_rewards`` chooses them by
  rank correlation with a judge on calibration prompts); other categories use ``rewards``.
- ``fk`` (Feynman-Kac steering; ``particles``, ``resample_at``, ``potential`` "max" | "difference" | "sum",
  ``lam`` 10, ``resampling`` "multinomial" | "systematic", ``ess_threshold`` 1.0, ``noise_level`` 0.7, ``sde_from``
  "first_resample", ``sde_until``): K particles per prompt sampled together, with ODE steps before ``sde_from``
  (default the first resampling step: until then the particles are distinct without noise) and the flow SDE from
  there to ``sde_until`` (default all but the last, which is an ODE step so that no noise is left in the image);
  at the resampling steps each particle's predicted clean image ``x - sigma * v`` is decoded and scored,
  log-weights grow by the log-potential (max: lam * max of the particle's rewards so far; sum: lam * their sum;
  difference: lam * (r_t - r_previous)), and when the effective sample size ``1 / sum w^2`` falls below
  ``ess_threshold * K`` the particles are resampled (weights reset). The best final particle by ``rewards`` is
  returned. ``potential_reward`` (default: ``rewards``) scores the predicted clean images at the resampling steps
  instead, e.g. a value model that reads blurry early predictions better than the final verifier does.
  Gradient-free: any reward (the exact judge, OCR, a detector).

``callback(progress)`` (optional) is told after every unit of work: each best-of-N candidate, each ReNO / CARINOX
iterate, each CARINOX exploration candidate, each FK resampling step (a ``Progress``: the step's reward and image
per prompt, the best reward so far, NFE so far). Returning True stops the job cleanly: best-of-N keeps the best
candidate so far, ReNO the best iterate so far (rendered as usual), CARINOX skips the rest of its exploration and
iterations, FK stops resampling and finishes its particles' trajectories; ``info["stopped_early"]`` says so. The
callback changes no number: without a stop the result is the one without a callback.

NFE = transformer forwards per image row, counted by a hook on the denoiser: one CFG evaluation is two forwards
(conditional and unconditional rows), a backward counts as two forwards, and the forward that gradient
checkpointing recomputes during the backward counts as one more. VAE decodes and reward models are not counted
(``seconds`` has them).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flowalign import samplers, seeding

METHODS = ("best_of_n", "reno", "carinox", "fk")
ALIASES = {"bon": "best_of_n", "best-of-n": "best_of_n", "fk_steering": "fk", "fk-steering": "fk"}
PRIORS = ("reno", "chi2", "none")
POTENTIALS = ("max", "difference", "sum")
RESAMPLING = ("multinomial", "systematic")


class NoiseOptError(ValueError):
    """Bad input to ``optimize`` (one line; the CLI prints it and exits with code 2)."""


# ================================================================================================ the prior
def noise_prior(z: torch.Tensor, kind: str = "reno") -> torch.Tensor:
    """Per-sample negative log-likelihood (up to a constant) of x_T under N(0, I), shape (B,).

    ``reno``: ReNO's ``0.5 ||z||^2 - (d - 1) log ||z||``, the negative log-density of ||z|| (a chi variable with d
    degrees of freedom; minimum at ||z|| = sqrt(d - 1)). ``chi2``: the negative log-density of ||z||^2 (chi-square
    with d degrees of freedom), ``0.5 ||z||^2 - (d / 2 - 1) log ||z||^2`` (minimum at ||z||^2 = d - 2). ``none``:
    zeros. d = elements per sample."""
    d = z[0].numel()
    sq = z.flatten(1).pow(2).sum(1)
    if kind == "reno":
        return 0.5 * sq - (d - 1) * 0.5 * torch.log(sq)
    if kind == "chi2":
        return 0.5 * sq - (d / 2 - 1) * torch.log(sq)
    if kind == "none":
        return torch.zeros_like(sq)
    raise NoiseOptError(f"unknown prior {kind!r}; known priors: {', '.join(PRIORS)}")


def preview_sigmas(sigmas: torch.Tensor, k: int) -> torch.Tensor:
    """The few-step sampler's sigmas: the full sampler's schedule (T + 1 values, the family's shift applied, last 0)
    at k + 1 evenly spaced indices, so every step is a real one. (The scheduler's own k-step schedule is not: a
    FlowMatchEuler k-step schedule ends 0.001 -> 0, which makes its "2 steps" one step.)"""
    T = len(sigmas) - 1
    if not 1 <= k <= T:
        raise NoiseOptError(f"sampler_steps must be between 1 and the sampling steps ({T}), got {k}")
    return sigmas[torch.linspace(0, T, k + 1).round().long()]


def clip_grad_per_sample(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient to norm <= max_norm (in place; returns the norms before clipping)."""
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    grad.mul_(scale.view(-1, *([1] * (grad.ndim - 1))))
    return norms


# ================================================================================================ FK pieces
def fk_log_potential(kind: str, r: torch.Tensor, state: dict) -> torch.Tensor:
    """log G_t of each particle at a resampling step, from its reward ``r`` (N,) and its history ``state``
    (updated in place; rows follow the particles through resampling). max: lam-free max of the rewards so far;
    sum: their sum; difference: r_t minus the previous resampling step's reward (0 before the first). The caller
    multiplies by lam."""
    if kind == "max":
        state["max"] = r.clone() if "max" not in state else torch.maximum(state["max"], r)
        return state["max"]
    if kind == "sum":
        state["sum"] = r.clone() if "sum" not in state else state["sum"] + r
        return state["sum"]
    if kind == "difference":
        prev = state.get("prev", torch.zeros_like(r))
        state["prev"] = r.clone()
        return r - prev
    raise NoiseOptError(f"unknown FK potential {kind!r}; known potentials: {', '.join(POTENTIALS)}")


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim (particles of one prompt); -inf log-weights get weight 0."""
    return torch.softmax(log_w.double(), dim=-1).to(log_w.dtype)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum_k w_k^2 of normalised weights (last dim)."""
    return 1.0 / w.pow(2).sum(-1)


def resample_indices(w: torch.Tensor, kind: str, generator: torch.Generator | None = None,
                     u: torch.Tensor | float | None = None) -> torch.Tensor:
    """K ancestor indices for one prompt's normalised weights ``w`` (K,). multinomial: K independent draws;
    systematic: positions (u + k) / K, u ~ U[0, 1) (or the given ``u``), each mapped to the first index whose
    cumulative weight exceeds it."""
    K = w.shape[-1]
    w = w.double()
    if kind == "multinomial":
        return torch.multinomial(w, K, replacement=True, generator=generator)
    if kind == "systematic":
        if u is None:
            u = torch.rand((), generator=generator, dtype=torch.float64)
        pos = (torch.as_tensor(u, dtype=torch.float64) + torch.arange(K, dtype=torch.float64)) / K
        cum = torch.cumsum(w, 0)
        cum[-1] = 1.0  # rounding: the last position always lands inside
        return torch.searchsorted(cum, pos, right=True).clamp(max=K - 1)
    raise NoiseOptError(f"unknown resampling {kind!r}; known: {', '.join(RESAMPLING)}")


# ================================================================================================ accounting
class NFECounter:
    """Counts transformer forwards (image rows) through a forward pre-hook on the denoiser. Rows run with grad
    enabled outside a backward belong to the graph being built; ``backward(loss)`` counts them as backpropagated
    (2 each), and forwards run during it (gradient checkpointing's recomputation) as plain forwards."""

    def __init__(self, module: torch.nn.Module):
        self.forwards = 0
        self.backward_rows = 0
        self._graph = 0
        self._in_backward = False
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) else 1
        self.forwards += n
        if torch.is_grad_enabled() and not self._in_backward:
            self._graph += n

    def backward(self, loss: torch.Tensor) -> None:
        self._in_backward = True
        try:
            loss.backward()
        finally:
            self._in_backward = False
        self.backward_rows += self._graph
        self._graph = 0

    def drop_graph(self) -> None:
        self._graph = 0

    @property
    def total(self) -> int:
        return self.forwards + 2 * self.backward_rows

    def close(self) -> None:
        self._handle.remove()


class PeakMemory:
    """Peak memory during a block: CUDA ``max_memory_allocated`` on a GPU device; on the CPU the peak resident set
    size of the process, sampled every 5 ms from /proc/self/statm (``ru_maxrss`` where there is no /proc)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self.start_mb = float("nan")
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            import os

            return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":  # untested here (no GPU)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            self._peak = self.start_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._rss_mb())
        return False


# ================================================================================================ result
@dataclass
class Progress:
    """What ``optimize``'s ``callback`` is told (one row per prompt). ``phase``: "candidate" (best-of-N: ``images``
    the best full sample so far), "explore" (CARINOX: this candidate's few-step preview), "iterate" (ReNO and
    CARINOX: this iterate's few-step preview; CARINOX: the best of each prompt's top_k runs), "resample" (FK: the
    predicted clean image of each prompt's best particle; ``reward`` the particles' mean, as in ``trajectory``).
    ``step`` counts from 0 within the phase, ``total`` is the phase's length."""
    method: str
    phase: str
    step: int
    total: int
    reward: torch.Tensor      # (B,) this step's reward (the value ``trajectory`` records)
    best: torch.Tensor        # (B,) the best reward seen so far in this phase
    images: torch.Tensor      # (B, 3, H, W) in [0, 1]
    nfe: int                  # transformer forwards so far


@dataclass
class NoiseResult:
    """What ``optimize`` returns. ``images`` (B, 3, H, W) in [0, 1]; ``noises`` (B, *latent) the chosen x_T (for FK
    the initial noise of the returned particle's ancestor); ``latents`` the final latents of the returned images;
    ``rewards`` every output of the reward on the returned images (``rewards["reward"]`` what was maximised);
    ``trajectory`` (T, B): best_of_n the best reward after each candidate, reno / carinox the reward of each iterate
    (the few-step preview; carinox: the best of the top_k runs), fk the mean particle reward at each resampling
    step and at the end; ``nfe`` total transformer forwards (module docstring), ``nfe_per_prompt``; ``seconds``;
    ``peak_memory_mb`` (the process's peak RSS on the CPU, peak allocated CUDA memory on a GPU; ``info[
    "memory_at_start_mb"]`` is the same measure when the call began); ``info`` the method's settings and diagnostics."""
    method: str
    prompts: list[str]
    images: torch.Tensor
    noises: torch.Tensor
    latents: torch.Tensor
    rewards: dict[str, torch.Tensor]
    trajectory: torch.Tensor
    nfe: int
    nfe_per_prompt: float
    seconds: float
    peak_memory_mb: float
    info: dict = field(default_factory=dict)
    particles: torch.Tensor | None = None  # FK: (B, K, *latent) final latents of every particle

    def summary(self) -> dict:
        """JSON-ready: everything but the tensors of images, noises and latents."""
        return {"method": self.method, "prompts": list(self.prompts),
                "reward": [float(v) for v in self.rewards["reward"]],
                "rewards": {k: [float(x) for x in v] for k, v in self.rewards.items()},
                "trajectory": [[float(x) for x in row] for row in self.trajectory],
                "nfe": int(self.nfe), "nfe_per_prompt": float(self.nfe_per_prompt), "seconds": float(self.seconds),
                "seconds_per_prompt": float(self.seconds / max(len(self.prompts), 1)),
                "peak_memory_mb": float(self.peak_memory_mb), "info": _jsonable(self.info)}


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)  # a reward object among the options (FK's potential_reward, CARINOX's category rewards)


# ================================================================================================ the context
def canonical_method(method: str) -> str:
    m = ALIASES.get(str(method).lower(), str(method).lower())
    if m not in METHODS:
        raise NoiseOptError(f"unknown method {method!r}; known methods: {', '.join(METHODS)} "
                            f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return m


def resolve_reward(rewards):
    """A ``Reward`` as it is, or a spec for ``build_rewards``."""
    from flowalign.rewards import Reward, build_rewards

    if isinstance(rewards, Reward):
        return rewards
    if rewards is None:
        raise NoiseOptError("no reward given: name at least one (e.g. rewards='shapeclip')")
    return build_rewards(rewards)


def non_differentiable_parts(reward) -> list[str]:
    """Names of the components of a reward that give no gradients (the reward itself when it is not a sum)."""
    from flowalign.rewards import WeightedSum

    if isinstance(reward, WeightedSum):
        return [n for n, r in reward.rewards.items() if not r.differentiable]
    return [] if reward.differentiable else [reward.name]


def _needing_metadata(reward) -> str:
    from flowalign.rewards import WeightedSum

    if isinstance(reward, WeightedSum):
        return ", ".join(repr(n) for n, r in reward.rewards.items() if r.needs_metadata)
    return repr(reward.name)


def check_differentiable(reward, method: str) -> None:
    bad = non_differentiable_parts(reward)
    if bad:
        names = ", ".join(repr(b) for b in bad)
        raise NoiseOptError(f"reward {names} is not differentiable: {method} needs gradients from the reward; use "
                            f"method 'best_of_n' or 'fk' for it, or a differentiable reward (e.g. 'shapeclip')")


def _positive_int(name: str, v, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise NoiseOptError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _positive_float(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (v == 0 and not allow_zero):
        raise NoiseOptError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")
    return float(v)


class _Ctx:
    """What every method shares: adapter, prompts, metadata, conditioning, seeds, the NFE counter."""

    def __init__(self, adapter, prompts, metadata, indices, seed, guidance, num_steps, batch_size, counter,
                 progress, callback=None, method=""):
        self.adapter, self.prompts, self.metadata = adapter, prompts, metadata
        self.indices, self.seed, self.guidance, self.num_steps = indices, seed, guidance, num_steps
        self.batch_size, self.counter, self.progress = batch_size, counter, progress
        self.callback, self.method = callback, method
        self.stop = {"requested": False}  # shared with sub-contexts (CARINOX's categories)
        self.cfg = guidance > 1.0
        self.cond = adapter.encode(prompts, negative="" if self.cfg else None)
        self.sigmas = adapter.schedule(num_steps)

    @property
    def rows_per_eval(self) -> int:
        """Transformer forwards per image per velocity evaluation (2 with CFG)."""
        return 2 if self.cfg else 1

    def sub(self, rows: torch.Tensor) -> "_Ctx":
        """The context of a subset of the prompts (CARINOX's categories)."""
        c = object.__new__(_Ctx)
        c.__dict__.update(self.__dict__)
        r = rows.tolist()
        c.prompts = [self.prompts[i] for i in r]
        c.metadata = [self.metadata[i] for i in r] if self.metadata is not None else None
        c.indices = [self.indices[i] for i in r]
        c.cond = self.cond.index(rows)
        return c

    @property
    def stopped(self) -> bool:
        return self.stop["requested"]

    def notify(self, phase: str, step: int, total: int, reward, best, images) -> bool:
        """Tell the callback (if any) about a finished unit of work; True when it asked to stop (then or before)."""
        if self.callback is None or self.stopped:
            return self.stopped
        p = Progress(self.method, phase, int(step), int(total), reward.detach().float().cpu(),
                     best.detach().float().cpu(), images.detach(), self.counter.total if self.counter else 0)
        if self.callback(p):
            self.stop["requested"] = True
        return self.stopped

    def noise(self, member: int) -> torch.Tensor:
        """(B, *latent) candidate ``member`` of every prompt: member 0 the base noise Generator(seed + index), the
        others from the named stream (seed, "noise/candidate", index, member)."""
        gens = [torch.Generator().manual_seed(self.seed + i) if member == 0
                else seeding.generator(self.seed, "noise/candidate", i, member) for i in self.indices]
        return torch.cat([self.adapter.init_noise(1, g) for g in gens]).to(self.adapter.device)

    def rep(self, k: int):
        """Prompts, metadata and cond repeated k times per prompt (rows prompt-major: row b * k + j)."""
        rows = torch.arange(len(self.prompts)).repeat_interleave(k)
        p = [self.prompts[i] for i in rows.tolist()]
        m = [self.metadata[i] for i in rows.tolist()] if self.metadata is not None else None
        return p, m, self.cond.index(rows.to(self.cond.embeds.device))

    # -------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def render(self, x: torch.Tensor, cond, num_steps: int | None = None):
        """Full deterministic ODE sampling of x (rows aligned with cond), chunked: (latents, images)."""
        sig = self.sigmas if num_steps is None else self.adapter.schedule(num_steps)
        lat, img = [], []
        for s in range(0, x.shape[0], self.batch_size):
            y, c = x[s:s + self.batch_size], cond.index(slice(s, s + self.batch_size))
            for i in range(len(sig) - 1):
                y = self.adapter.step(y, sig, i, c, self.guidance, 0.0).next
            lat.append(y)
            img.append(self.adapter.decode(y))
        return torch.cat(lat), torch.cat(img)

    def preview(self, z: torch.Tensor, cond, sigmas, checkpointing: bool) -> torch.Tensor:
        """The differentiable few-step ODE sampler: latents after len(sigmas) - 1 Euler steps from z."""
        from torch.utils.checkpoint import checkpoint

        x = z
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]

            def vel(xx, s=s):
                return self.adapter.predict(xx, s, cond, self.guidance)

            v = checkpoint(vel, x, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else vel(x)
            x = samplers.ode_step(x, v, s, s_next).next
        return x

    def score(self, reward, images, prompts, metadata, grad: bool = False) -> dict[str, torch.Tensor]:
        if grad:
            return reward(images, prompts, metadata, grad=True)
        with torch.no_grad():
            return reward(images, prompts, metadata)


# ================================================================================================ methods
def _best_of_n(ctx: _Ctx, reward, n: int) -> dict:
    B = len(ctx.prompts)
    best_r = torch.full((B,), -math.inf)
    best = {}
    traj = []
    members = range(n)
    if ctx.progress:
        from tqdm import tqdm
        members = tqdm(members, desc="best-of-N", leave=False)
    for j in members:
        z = ctx.noise(j)
        lat, img = ctx.render(z, ctx.cond)
        out = ctx.score(reward, img, ctx.prompts, ctx.metadata)
        r = out["reward"].detach().cpu().float()
        better = torch.nan_to_num(r, nan=-math.inf) > best_r
        if j == 0:
            best = {"noises": z, "latents": lat, "images": img, "rewards": {k: v.detach() for k, v in out.items()}}
        else:
            m = better.to(z.device)
            for key, val in (("noises", z), ("latents", lat), ("images", img)):
                best[key] = torch.where(m.view(-1, *([1] * (val.ndim - 1))), val, best[key])
            for k, v in out.items():
                best["rewards"][k] = torch.where(better.to(v.device), v.detach(), best["rewards"][k])
        best_r = torch.where(better, r, best_r)
        traj.append(best_r.clone())
        if ctx.notify("candidate", j, n, r, best_r, best["images"]):
            break
    best["trajectory"] = torch.stack(traj)
    best["info"] = {"n": n, "stopped_early": ctx.stopped and len(traj) < n}
    return best


def _reno_loop(ctx: _Ctx, reward, z0, prompts, metadata, cond, iterations, sampler_steps, lr, momentum, nesterov,
               clip, prior, prior_weight, checkpointing, optimizer, chunk=None, notify=None):
    """Gradient ascent on the rows of z0 (rows aligned with prompts/cond). Returns the best iterate per row, its
    preview reward and the trajectory (iterations + 1 rows, fewer when ``notify(it, total, reward, best, images)``
    asks to stop).

    ``chunk`` (rows per forward/backward; None: all rows at once) bounds the graph's memory: the chunks run in
    lockstep, each with its own optimiser over its own rows, which gives the same iterates as one batch (the loss
    is a sum over rows, the clipping per row, SGD / Adam per element). With more than one chunk each chunk's
    backward runs before ``notify`` (its graph is freed at once), so a stop costs that iterate's backward too."""
    sig = preview_sigmas(ctx.sigmas, sampler_steps)
    N = z0.shape[0]
    chunk = N if chunk is None else min(int(chunk), N)
    parts = []
    for s0 in range(0, N, chunk):
        sl = slice(s0, s0 + chunk)
        z = z0[sl].detach().clone().requires_grad_(True)
        if optimizer == "sgd":
            opt = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        elif optimizer == "adam":
            opt = torch.optim.Adam([z], lr=lr, eps=1e-2)  # ReNO's Adam setting
        else:
            raise NoiseOptError(f"unknown optimizer {optimizer!r}; known: sgd, adam")
        parts.append((sl, z, opt, [prompts[i] for i in range(N)[sl]],
                      [metadata[i] for i in range(N)[sl]] if metadata is not None else None, cond.index(sl)))
    hold = len(parts) == 1  # one batch: backpropagate after notify (a stop then costs no backward)
    best_r = torch.full((N,), -math.inf)
    best_z = z0.detach().clone()
    traj, grad_norms = [], []
    its = range(iterations + 1)
    if ctx.progress:
        from tqdm import tqdm
        its = tqdm(its, desc="ReNO", leave=False)

    def loss_of(r, z, finite):
        mask = finite.to(r.device)
        loss = -(torch.where(mask, r, torch.zeros_like(r))).sum()
        if prior != "none" and prior_weight > 0:
            # the prior is on the standard normal draw: x_T / std (a DDPM adapter's x_T has std != 1)
            loss = loss + prior_weight * noise_prior(z / getattr(ctx.adapter, "init_noise_std", 1.0), prior).sum()
        return loss

    for it in its:
        last = it == iterations
        rcs, imgs, pending = [], [], []
        for sl, z, opt, p, m, c in parts:
            with torch.set_grad_enabled(not last):
                x = ctx.preview(z, c, sig, checkpointing)
                img = ctx.adapter.decode(x, differentiable=not last)
                r = ctx.score(reward, img, p, m, grad=not last)["reward"]
            rc = r.detach().float().cpu()
            finite = torch.isfinite(rc)
            rcs.append(rc)
            imgs.append(img.detach())
            if last:
                continue
            loss = loss_of(r, z, finite)
            opt.zero_grad(set_to_none=True)
            if hold:
                pending.append(loss)
            else:
                ctx.counter.backward(loss)
                del loss, r, img, x
        rc = torch.cat(rcs)
        img = torch.cat(imgs)
        finite = torch.isfinite(rc)
        better = finite & (rc > best_r)
        zs = torch.cat([z.detach() for _, z, *_ in parts])
        best_z = torch.where(better.to(zs.device).view(-1, *([1] * (zs.ndim - 1))), zs, best_z)
        best_r = torch.where(better, rc, best_r)
        traj.append(rc)
        if notify is not None and notify(it, iterations + 1, rc, best_r, img):
            ctx.counter.drop_graph()  # the iterate's graph is never backpropagated
            break
        if last:
            break
        norms = []
        for k, (sl, z, opt, *_) in enumerate(parts):
            if hold:
                ctx.counter.backward(pending[k])
            z.grad[~finite[sl].to(z.device)] = 0.0  # a non-finite reward moves nothing
            norms.append(clip_grad_per_sample(z.grad, clip) if clip else z.grad.flatten(1).norm(dim=1))
            opt.step()
        pending.clear()
        grad_norms.append(torch.cat(norms).mean().item())
    return best_z, best_r, torch.stack(traj), grad_norms, lr


def _reno_options(o: dict, num_steps: int) -> dict:
    return dict(sampler_steps=_positive_int("sampler_steps", o.pop("sampler_steps", min(4, num_steps))),
                lr=_positive_float("lr", o.pop("lr", 5.0)),
                momentum=_positive_float("momentum", o.pop("momentum", 0.9), allow_zero=True),
                nesterov=bool(o.pop("nesterov", True)),
                clip=_positive_float("clip", o.pop("clip", 0.1), allow_zero=True),
                prior=o.pop("prior", "reno"),
                prior_weight=_positive_float("prior_weight", o.pop("prior_weight", 0.01), allow_zero=True),
                checkpointing=bool(o.pop("checkpointing", True)),
                optimizer=o.pop("optimizer", "sgd"),
                chunk=_positive_int("chunk (ReNO rows per forward/backward)", o.pop("chunk", None), allow_none=True))


def _reno(ctx: _Ctx, reward, iterations: int, final: str, init: torch.Tensor | None, ro: dict) -> dict:
    z0 = ctx.noise(0) if init is None else init.to(ctx.adapter.device).float()

    def notify(it, total, r, best, img):
        return ctx.notify("iterate", it, total, r, best, img)

    best_z, best_r, traj, gn, lr = _reno_loop(ctx, reward, z0, ctx.prompts, ctx.metadata, ctx.cond, iterations,
                                              **ro, notify=notify)
    if final == "preview":
        with torch.no_grad():
            lat = ctx.preview(best_z, ctx.cond, preview_sigmas(ctx.sigmas, ro["sampler_steps"]), False)
            img = ctx.adapter.decode(lat)
    else:
        lat, img = ctx.render(best_z, ctx.cond)
    out = ctx.score(reward, img, ctx.prompts, ctx.metadata)
    return {"noises": best_z, "latents": lat, "images": img, "rewards": {k: v.detach() for k, v in out.items()},
            "trajectory": traj, "info": dict(ro, lr=lr, iterations=iterations, final=final,
                                             best_preview_reward=best_r.tolist(),
                                             mean_grad_norm_before_clip=gn,
                                             stopped_early=len(traj) < iterations + 1)}


def _carinox(ctx: _Ctx, reward, n_explore: int, top_k: int, iterations: int, ro: dict) -> dict:
    B, k = len(ctx.prompts), top_k
    sig = preview_sigmas(ctx.sigmas, ro["sampler_steps"])
    # (a) exploration on the few-step preview
    cand, scores = [], []
    for j in range(n_explore):
        z = ctx.noise(j)
        with torch.no_grad():
            img = ctx.adapter.decode(ctx.preview(z, ctx.cond, sig, False))
        cand.append(z)
        scores.append(ctx.score(reward, img, ctx.prompts, ctx.metadata)["reward"].detach().float().cpu())
        if ctx.notify("explore", j, n_explore, scores[-1],
                      torch.nan_to_num(torch.stack(scores, 1), nan=-math.inf).amax(1), img):
            break
    explored = len(cand)
    k = min(k, explored)  # a stop during exploration keeps what was explored
    scores = torch.nan_to_num(torch.stack(scores, 1), nan=-math.inf)  # (B, explored)
    top = scores.topk(k, dim=1).indices  # (B, k)
    cand = torch.stack(cand, 1)  # (B, n_explore, *latent)
    z0 = cand[torch.arange(B, device=cand.device)[:, None], top.to(cand.device)].flatten(0, 1)  # rows b * k + j
    prompts, metadata, cond = ctx.rep(k)
    # (b) ReNO from each seed

    def notify(it, total, r, best, img):  # rows b * k + j -> per prompt: the best of its k runs
        pick = torch.nan_to_num(r.view(B, k), nan=-math.inf).argmax(1)
        rows = torch.arange(B) * k + pick
        return ctx.notify("iterate", it, total, r.view(B, k)[torch.arange(B), pick], best.view(B, k).amax(1),
                          img[rows.to(img.device)])

    best_z, best_r, traj, gn, lr = _reno_loop(ctx, reward, z0, prompts, metadata, cond, iterations, **ro,
                                              notify=notify)
    # (c) the k results rendered in full, the best by reward kept
    lat, img = ctx.render(best_z, cond)
    out = ctx.score(reward, img, prompts, metadata)
    r = torch.nan_to_num(out["reward"].detach().float().cpu(), nan=-math.inf).view(B, k)
    pick = r.argmax(1)
    rows = (torch.arange(B) * k + pick)
    dev = best_z.device
    return {"noises": best_z[rows.to(dev)], "latents": lat[rows.to(lat.device)], "images": img[rows.to(img.device)],
            "rewards": {kk: v.detach()[rows.to(v.device)] for kk, v in out.items()},
            "trajectory": traj.view(-1, B, k).amax(2),
            "info": dict(ro, lr=lr, n_explore=n_explore, top_k=k, iterations=iterations,
                         explored_best=scores.amax(1).tolist(), seeds_kept=top.tolist(), picked=pick.tolist(),
                         mean_grad_norm_before_clip=gn,
                         stopped_early=explored < n_explore or traj.shape[0] < iterations + 1)}


def _fk(ctx: _Ctx, reward, K: int, resample_at: list[int], potential: str, lam: float, resampling: str,
        ess_threshold: float, noise_level: float, sde_until: int, sde_from: int = 0, potential_reward=None) -> dict:
    B, T = len(ctx.prompts), ctx.num_steps
    pot_reward = reward if potential_reward is None else potential_reward  # scores x0-hat at resampling steps
    prompts, metadata, cond = ctx.rep(K)
    dev = ctx.adapter.device
    gens = [seeding.generator(ctx.seed, "noise/fk", i) for i in ctx.indices]
    z = torch.stack([ctx.noise(j) for j in range(K)], 1)  # (B, K, *latent): particle j starts at candidate j
    shape = z.shape[2:]
    x = z.flatten(0, 1).clone()
    origin = torch.arange(K).repeat(B, 1)  # (B, K): which initial candidate each particle descends from
    log_w = torch.zeros(B, K, dtype=torch.float64)
    state: dict = {}
    traj, ess_log, resampled, ancestors_log = [], [], [], []
    sig = ctx.sigmas
    steps = range(T)
    if ctx.progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="FK", leave=False)
    with torch.no_grad():
        for i in steps:
            v = torch.cat([ctx.adapter.predict(x[s:s + ctx.batch_size], sig[i],
                                               cond.index(slice(s, s + ctx.batch_size)), ctx.guidance)
                           for s in range(0, x.shape[0], ctx.batch_size)])
            if i in resample_at and not ctx.stopped:
                x0 = x - sig[i].to(x.device, x.dtype) * v
                img = torch.cat([ctx.adapter.decode(x0[s:s + ctx.batch_size])
                                 for s in range(0, x0.shape[0], ctx.batch_size)])
                r = torch.nan_to_num(ctx.score(pot_reward, img, prompts, metadata)["reward"].detach().double().cpu(),
                                     nan=-1e9)
                traj.append(r.view(B, K).mean(1).float())
                log_w = log_w + lam * fk_log_potential(potential, r, state).view(B, K)
                w = normalized_weights(log_w)
                ess = effective_sample_size(w)
                ess_log.append(ess.tolist())
                do = ess < ess_threshold * K - 1e-9
                resampled.append(do.tolist())
                if do.any():
                    anc = torch.arange(K).repeat(B, 1)
                    for b in torch.nonzero(do).flatten().tolist():
                        anc[b] = resample_indices(w[b], resampling, gens[b])
                    flat = (torch.arange(B)[:, None] * K + anc).flatten()
                    x, v = x[flat.to(dev)], v[flat.to(dev)]
                    origin = origin.gather(1, anc)
                    for key in state:
                        state[key] = state[key][flat]
                    log_w[do] = 0.0
                ancestors_log.append([len(set(row)) for row in origin.tolist()])
                if ctx.callback is not None:
                    rk = r.view(B, K).float()
                    top = (torch.arange(B) * K + rk.argmax(1)).to(img.device)
                    ctx.notify("resample", len(traj) - 1, len(resample_at), traj[-1], rk.amax(1), img[top])
            eta = noise_level if sde_from <= i <= sde_until else 0.0
            if eta > 0:
                noise = torch.stack([torch.randn((K, *shape), generator=g) for g in gens]).flatten(0, 1).to(dev)
                x = samplers.flow_sde_step(x, v, sig[i], sig[i + 1], eta, sigma_cap=float(sig[1]), noise=noise).next
            else:
                x = samplers.ode_step(x, v, sig[i], sig[i + 1]).next
        img = torch.cat([ctx.adapter.decode(x[s:s + ctx.batch_size]) for s in range(0, x.shape[0], ctx.batch_size)])
        out = ctx.score(reward, img, prompts, metadata)
    r = torch.nan_to_num(out["reward"].detach().float().cpu(), nan=-math.inf).view(B, K)
    traj.append(r.mean(1))
    pick = r.argmax(1)
    rows = torch.arange(B) * K + pick
    noises = z[torch.arange(B), origin[torch.arange(B), pick]]
    return {"noises": noises, "latents": x[rows.to(x.device)], "images": img[rows.to(img.device)],
            "rewards": {kk: vv.detach()[rows.to(vv.device)] for kk, vv in out.items()},
            "trajectory": torch.stack(traj), "particles": x.view(B, K, *shape),
            "info": {"particles": K, "resample_at": list(resample_at), "potential": potential, "lam": lam,
                     "resampling": resampling, "ess_threshold": ess_threshold, "noise_level": noise_level,
                     "sde_until": sde_until, "sde_from": sde_from, "ess": ess_log, "resampled": resampled,
                     "potential_reward": None if potential_reward is None else repr(potential_reward),
                     "final_particle_rewards": r.tolist(), "stopped_early": len(traj) < len(resample_at) + 1,
                     # distinct initial noises among each prompt's particles after each resampling step / at the end
                     "ancestors": ancestors_log, "final_ancestors": [len(set(row)) for row in origin.tolist()]}}


# ================================================================================================ budgets
def cost_per_prompt(method: str, num_steps: int, cfg: bool, **o) -> int:
    """NFE per prompt a method uses with the given counts (the formula the tests check against the hook)."""
    f = 2 if cfg else 1
    full = num_steps * f
    if method == "best_of_n":
        return o["n"] * full
    if method == "fk":
        return o["particles"] * full
    prev = o.get("sampler_steps", min(4, num_steps)) * f
    per_it = prev * (4 if o.get("checkpointing", True) else 3)
    if method == "reno":
        return o["iterations"] * per_it + prev + (prev if o.get("final", "full") == "preview" else full)
    if method == "carinox":
        k = o["top_k"]
        return o["n_explore"] * prev + k * (o["iterations"] * per_it + prev) + k * full
    raise NoiseOptError(f"unknown method {method!r}")


def _from_budget(method: str, budget: int, num_steps: int, cfg: bool, o: dict) -> dict:
    """Fill the method's count from an NFE budget per prompt (the largest count that fits)."""
    f = 2 if cfg else 1
    full = num_steps * f
    if method in ("best_of_n", "fk"):
        key = "n" if method == "best_of_n" else "particles"
        if o.get(key) is None:
            o[key] = budget // full
            if o[key] < 1:
                raise NoiseOptError(f"budget {budget} NFE per prompt is below one full sample ({full} NFE: "
                                    f"{num_steps} steps x {f})")
        return o
    if o.get("iterations") is None:
        probe = dict(o, iterations=0)
        base, per = cost_per_prompt(method, num_steps, cfg, **probe), \
            cost_per_prompt(method, num_steps, cfg, **dict(probe, iterations=1)) - cost_per_prompt(
                method, num_steps, cfg, **probe)
        it = (budget - base) // per
        if it < 1:
            raise NoiseOptError(f"budget {budget} NFE per prompt leaves no {method} iteration (the fixed part "
                                f"costs {base} NFE, one iteration {per})")
        o["iterations"] = int(it)
    return o


def default_resample_at(num_steps: int, every: int | None = None, until: float = 0.75) -> list[int]:
    """Resampling steps: every ``every`` steps (default num_steps // 5) from the first interval to ``until`` of the
    schedule (layout is decided early; late resampling only removes diversity)."""
    every = every or max(1, num_steps // 5)
    return [i for i in range(every, max(every + 1, int(num_steps * until) + 1), every) if i < num_steps]


# ================================================================================================ the call
def optimize(adapter, prompts: Sequence[str], rewards, method: str = "reno", budget: int | None = None,
             seed: int = 0, *, metadata: Sequence[dict] | None = None, guidance: float = 3.0, num_steps: int = 20,
             indices: Sequence[int] | None = None, batch_size: int = 256, progress: bool = False,
             callback: Callable[[Progress], bool | None] | None = None, **options) -> NoiseResult:
    """Run one inference-time method on a batch of prompts (module docstring). Bad input raises a one-line
    ``NoiseOptError`` (or ``RewardError`` from the reward spec). ``callback(Progress)`` is told about every
    iteration; returning True stops the job early (module docstring)."""
    from flowalign.rewards import Reward

    method = canonical_method(method)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise NoiseOptError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise NoiseOptError(f"prompt {i} is empty" if isinstance(p, str) else
                                f"prompt {i} is not a string: {p!r}")
    if metadata is not None:
        metadata = list(metadata)
        if len(metadata) != len(prompts):
            raise NoiseOptError(f"got {len(prompts)} prompts but {len(metadata)} metadata records")
    num_steps = _positive_int("num_steps (sampling steps)", num_steps)
    batch_size = _positive_int("batch_size", batch_size)
    budget = _positive_int("budget (NFE per prompt)", budget, allow_none=True)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise NoiseOptError(f"guidance must be a non-negative number, got {guidance!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise NoiseOptError(f"seed must be an integer, got {seed!r}")
    if callback is not None and not callable(callback):
        raise NoiseOptError(f"callback must be callable, got {callback!r}")
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise NoiseOptError(f"got {len(prompts)} prompts but {len(indices)} indices")
    o = dict(options)
    cfg = guidance > 1.0
    reward = resolve_reward(rewards)
    category_rewards, category_key = None, o.pop("category_key", "tag")
    if method == "carinox" and o.get("category_rewards") is not None:
        category_rewards = {str(c): resolve_reward(r) for c, r in dict(o.pop("category_rewards")).items()}
        if metadata is None:
            raise NoiseOptError(f"category_rewards route by metadata[{category_key!r}]: pass metadata")
    o.pop("category_rewards", None)
    potential_reward = o.pop("potential_reward", None)
    if potential_reward is not None:
        if method != "fk":
            raise NoiseOptError(f"potential_reward is an FK option; method {method!r} has none")
        potential_reward = resolve_reward(potential_reward)
    used = [reward] + list((category_rewards or {}).values()) + ([potential_reward] if potential_reward else [])
    for r in used:
        if not isinstance(r, Reward):
            raise NoiseOptError(f"not a reward: {r!r}")
        if method in ("reno", "carinox"):
            check_differentiable(r, method)
    for r in used:
        if r.needs_metadata and metadata is None:
            raise NoiseOptError(f"reward {_needing_metadata(r)} needs metadata (GenEval records): pass metadata=")

    # ----------------------------------------------------------------------------- method options
    if method == "best_of_n":
        o["n"] = _positive_int("n (candidates)", o.get("n"), allow_none=True)
    elif method == "fk":
        o["particles"] = _positive_int("particles", o.get("particles"), allow_none=True)
    else:
        o["iterations"] = _positive_int("steps (iterations)", o.get("iterations"), allow_none=True)
        ro = _reno_options(o, num_steps)
        preview_sigmas(torch.linspace(1, 0, num_steps + 1), ro["sampler_steps"])  # 1 <= sampler_steps <= num_steps
        if ro["prior"] not in PRIORS:
            raise NoiseOptError(f"unknown prior {ro['prior']!r}; known priors: {', '.join(PRIORS)}")
        if method == "carinox":
            o["n_explore"] = _positive_int("n_explore", o.pop("n_explore", 8))
            o["top_k"] = _positive_int("top_k", o.pop("top_k", 2))
            if o["top_k"] > o["n_explore"]:
                raise NoiseOptError(f"top_k ({o['top_k']}) cannot exceed n_explore ({o['n_explore']})")
        else:
            o["final"] = o.pop("final", "full")
            if o["final"] not in ("full", "preview"):
                raise NoiseOptError(f"final must be 'full' or 'preview', got {o['final']!r}")
        o.update(sampler_steps=ro["sampler_steps"], checkpointing=ro["checkpointing"])
    if budget is not None:
        o = _from_budget(method, budget, num_steps, cfg, o)
    for key, default in (("n", 4), ("particles", 4), ("iterations", 50)):
        if key in o and o[key] is None:
            o[key] = default
    fk_opts = {}
    if method == "fk":
        ra = o.pop("resample_at", None)
        ra = default_resample_at(num_steps, o.pop("resample_every", None)) if ra is None else sorted(set(ra))
        if any((not isinstance(i, (int, np.integer))) or not 0 <= i < num_steps for i in ra):
            raise NoiseOptError(f"resample_at must hold step indices in [0, {num_steps}), got {ra!r}")
        potential, resampling = o.pop("potential", "max"), o.pop("resampling", "multinomial")
        if potential not in POTENTIALS:
            raise NoiseOptError(f"unknown FK potential {potential!r}; known potentials: {', '.join(POTENTIALS)}")
        if resampling not in RESAMPLING:
            raise NoiseOptError(f"unknown resampling {resampling!r}; known: {', '.join(RESAMPLING)}")
        ess = _positive_float("ess_threshold", o.pop("ess_threshold", 1.0))
        if ess > 1:
            raise NoiseOptError(f"ess_threshold is a fraction of the particles in (0, 1], got {ess}")
        eta = _positive_float("noise_level", o.pop("noise_level", 0.7), allow_zero=True)
        until = o.pop("sde_until", None)
        until = num_steps - 2 if until is None else int(until)  # the last step to sigma 0 is an ODE step
        # before the first resampling step the particles are distinct already: ODE steps there (measured on
        # training prompts: with SDE steps there steering bought nothing on its own reward; docs/noise.md)
        sde_from = o.pop("sde_from", "first_resample")
        sde_from = (min(ra) if ra else 0) if sde_from == "first_resample" else int(sde_from)
        fk_opts = dict(resample_at=[int(i) for i in ra], potential=potential,
                       lam=_positive_float("lam", o.pop("lam", 10.0), allow_zero=True), resampling=resampling,
                       ess_threshold=ess, noise_level=eta, sde_until=until, sde_from=sde_from,
                       potential_reward=potential_reward)
    init = o.pop("init", None) if method == "reno" else None
    known = {"best_of_n": {"n"}, "fk": {"particles"}, "reno": {"iterations", "final", "sampler_steps",
                                                                 "checkpointing"},
             "carinox": {"iterations", "n_explore", "top_k", "sampler_steps", "checkpointing"}}[method]
    extra = sorted(set(o) - known)
    if extra:
        raise NoiseOptError(f"method {method!r} has no option(s) {', '.join(map(repr, extra))}")

    # ----------------------------------------------------------------------------- run
    counter = NFECounter(adapter.denoiser)
    try:
        with PeakMemory(adapter.device) as mem:
            t0 = time.perf_counter()
            ctx = _Ctx(adapter, prompts, metadata, indices, int(seed), float(guidance), num_steps, batch_size,
                       counter, progress, callback, method)
            if method == "best_of_n":
                out = _best_of_n(ctx, reward, o["n"])
            elif method == "reno":
                out = _reno(ctx, reward, o["iterations"], o["final"], init, ro)
            elif method == "fk":
                out = _fk(ctx, reward, o["particles"], **fk_opts)
            else:
                out = _run_carinox(ctx, reward, category_rewards, category_key, o, ro)
            seconds = time.perf_counter() - t0
    finally:
        counter.close()
    info = dict(out.get("info", {}), guidance=float(guidance), num_steps=num_steps, seed=int(seed),
                budget=budget, reward=repr(reward), memory_at_start_mb=mem.start_mb)
    res = NoiseResult(method=method, prompts=prompts, images=out["images"].detach(), noises=out["noises"].detach(),
                      latents=out["latents"].detach(), rewards=out["rewards"], trajectory=out["trajectory"].float(),
                      nfe=counter.total, nfe_per_prompt=counter.total / len(prompts), seconds=seconds,
                      peak_memory_mb=mem.peak_mb, info=info)
    res.particles = out.get("particles")
    return res


def _run_carinox(ctx: _Ctx, reward, category_rewards, category_key, o, ro) -> dict:
    """CARINOX per category group: each group of prompts runs with its category's reward."""
    B = len(ctx.prompts)
    if not category_rewards:
        out = _carinox(ctx, reward, o["n_explore"], o["top_k"], o["iterations"], ro)
        out["info"]["reward_per_category"] = {"*": repr(reward)}
        return out
    cats = [str(m.get(category_key, "")) for m in ctx.metadata]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cats):
        groups.setdefault(c, []).append(i)
    parts = {}
    for c, rows in groups.items():
        r = category_rewards.get(c, reward)
        parts[c] = (rows, _carinox(ctx.sub(torch.tensor(rows)), r, o["n_explore"], o["top_k"], o["iterations"], ro))
    # reassemble in prompt order; reward outputs may differ per category: keep "reward" (and shared keys)
    keys = set.intersection(*[set(p["rewards"]) for _, p in parts.values()])
    first = next(iter(parts.values()))[1]
    out = {k: torch.empty((B, *first[k].shape[1:]), dtype=first[k].dtype, device=first[k].device)
           for k in ("noises", "latents", "images")}
    rew = {k: torch.empty(B, dtype=torch.float32) for k in keys}
    traj = torch.empty(first["trajectory"].shape[0], B)
    for rows, p in parts.values():
        idx = torch.tensor(rows)
        for k in ("noises", "latents", "images"):
            out[k][idx.to(out[k].device)] = p[k]
        for k in keys:
            rew[k][idx] = p["rewards"][k].float().cpu()
        traj[:, idx] = p["trajectory"]
    out["rewards"], out["trajectory"] = rew, traj
    out["info"] = dict(ro, lr=first["info"]["lr"], n_explore=o["n_explore"], top_k=o["top_k"],
                       iterations=o["iterations"],
                       reward_per_category={c: repr(category_rewards.get(c, reward)) for c in groups})
    return out


# ================================================================================================ CARINOX's selection
@dataclass
class RewardSelection:
    """Per category: the chosen candidate's name, every candidate's rank correlation with the judge, and n."""
    chosen: dict[str, str]
    correlations: dict[str, dict[str, float]]
    n: dict[str, int]
    specs: dict[str, object]

    def category_rewards(self) -> dict[str, object]:
        """category -> reward spec (for ``optimize(..., method='carinox', category_rewards=...)``)."""
        return {c: self.specs[name] for c, name in self.chosen.items()}

    def table(self) -> str:
        names = list(self.specs)
        lines = ["| category | n | " + " | ".join(names) + " | chosen |", "|---|---|" + "---|" * (len(names) + 1)]
        for c, corr in self.correlations.items():
            cells = " | ".join("–" if not math.isfinite(corr[n]) else f"{corr[n]:+.2f}" for n in names)
            lines.append(f"| {c} | {self.n[c]} | {cells} | {self.chosen[c]} |")
        return "\n".join(lines)


def rank_correlation(a, b) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def select_rewards(images, metadata: Sequence[dict], candidates: Mapping[str, object], judge: Callable,
                   category_key: str = "tag", default: str | None = None) -> RewardSelection:
    """CARINOX's reward choice per prompt category: each candidate reward (name -> spec or ``Reward``) scores the
    calibration images (B, 3, H, W) in [0, 1]; ``judge(metadata, images_uint8) -> scores`` gives the reference
    (on ShapeWorld the exact detector's partial credit; any judge works, e.g. human labels); per category the
    candidate with the highest Spearman correlation wins (``default``, else the first candidate, where no candidate
    correlates: a constant judge or rewards)."""
    from flowalign.rewards import to_uint8

    if not candidates:
        raise NoiseOptError("select_rewards needs at least one candidate reward")
    metadata = list(metadata)
    prompts = [m["prompt"] for m in metadata]
    target = np.asarray(judge(metadata, to_uint8(images)), dtype=float)
    if len(target) != len(metadata):
        raise NoiseOptError(f"judge returned {len(target)} scores for {len(metadata)} images")
    scores = {}
    for name, spec in candidates.items():
        r = resolve_reward(spec)
        with torch.no_grad():
            scores[name] = r(images, prompts, metadata if r.needs_metadata else None)["reward"].float().cpu().numpy()
    cats: dict[str, list[int]] = {}
    for i, m in enumerate(metadata):
        cats.setdefault(str(m.get(category_key, "")), []).append(i)
    default = default or next(iter(candidates))
    chosen, corr = {}, {}
    for c, rows in cats.items():
        corr[c] = {n: rank_correlation(s[rows], target[rows]) for n, s in scores.items()}
        finite = {n: v for n, v in corr[c].items() if math.isfinite(v)}
        chosen[c] = max(finite, key=finite.get) if finite else default
    return RewardSelection(chosen=chosen, correlations=corr, n={c: len(r) for c, r in cats.items()},
                           specs=dict(candidates))


def shapeworld_judge(metadata: Sequence[dict], images) -> list[float]:
    """The exact ShapeWorld detector's GenEval partial credit (the training judge), as a calibration judge."""
    from flowalign.eval.geneval import score_images

    return [r["partial"] for r in score_images(metadata, images)["per_image"]]


def base_samples(adapter, prompts: Sequence[str], seed: int = 0, indices: Sequence[int] | None = None,
                 guidance: float = 3.0, num_steps: int = 20, batch_size: int = 256):
    """(latents, images) of the base ODE sampler from the noises ``optimize`` starts from (candidate 0 of each
    prompt): the images ``eval.benchmark.generate`` gives at this seed."""
    prompts = list(prompts)
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    ctx = _Ctx(adapter, prompts, None, indices, int(seed), float(guidance), int(num_steps), batch_size, None, False)
    return ctx.render(ctx.noise(0), ctx.cond)


# ================================================================================================ CLI driver
def metadata_for_prompt(prompt: str) -> dict | None:
    """The ShapeWorld GenEval record of a prompt when it is one of ShapeWorld's prompts, else None."""
    from flowalign.shapeworld.prompts import all_metadata

    for metas in all_metadata().values():
        for m in metas:
            if m["prompt"] == prompt:
                return dict(m)
    return None


def parse_reward_args(items: Sequence[str] | None) -> dict:
    """``["shapeclip=1", "artifact=0.1"]`` -> ``{"shapeclip": 1.0, "artifact": 0.1}`` (a bare name weighs 1)."""
    spec = {}
    for it in items or ["shapeclip=1"]:
        name, _, w = str(it).partition("=")
        if not name.strip():
            raise NoiseOptError(f"bad --reward {it!r}: want NAME or NAME=WEIGHT")
        try:
            spec[name.strip()] = float(w) if w.strip() else 1.0
        except ValueError:
            raise NoiseOptError(f"bad --reward {it!r}: the weight {w!r} is not a number") from None
    return spec


def _upscale(img: torch.Tensor, side: int = 128):
    from PIL import Image

    a = (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    return im.resize((side, side), Image.NEAREST) if im.width < side else im


def save_before_after(before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str], r_before, r_after, path,
                      max_rows: int = 16, side: int = 128):
    """A PNG: one row per prompt (at most ``max_rows``), the base sample and the optimised one with their rewards."""
    from PIL import Image, ImageDraw

    from flowalign.eval.benchmark import _font

    n = min(len(prompts), max_rows)
    pad, text_w = 4, 300
    W, H = text_w + 2 * (side + pad) + pad, n * (side + pad) + pad + 18
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    font = _font(12)
    d.text((text_w + pad, 2), "before", fill=(0, 0, 0), font=font)
    d.text((text_w + side + 2 * pad, 2), "after", fill=(0, 0, 0), font=font)
    import textwrap

    for i in range(n):
        y = 18 + i * (side + pad)
        lines = textwrap.wrap(prompts[i], 40)[:4] + [f"reward {float(r_before[i]):.3f} -> {float(r_after[i]):.3f}"]
        d.multiline_text((pad, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        grid.paste(_upscale(before[i], side), (text_w + pad, y))
        grid.paste(_upscale(after[i], side), (text_w + side + 2 * pad, y))
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def save_reward_curve(trajectory: torch.Tensor, method: str, path, reference: float | None = None):
    """The reward trajectory (T, B): every prompt thin, the mean thick; ``reference`` (the base samples' mean
    reward) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = trajectory.float().numpy()
    xlabel = {"best_of_n": "candidates", "fk": "resampling step (last: final particles)"}.get(method, "iteration")
    x = np.arange(1, len(t) + 1) if method == "best_of_n" else np.arange(len(t))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b in range(min(t.shape[1], 32)):
        ax.plot(x, t[:, b], color="#9ab", lw=0.8, alpha=0.7)
    ax.plot(x, np.nanmean(np.where(np.isfinite(t), t, np.nan), 1), color="#136", lw=2.2, label="mean over prompts")
    if reference is not None:
        ax.axhline(reference, color="#c40", ls="--", lw=1.2, label="base sample (full sampler)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward" + (" (few-step preview)" if method in ("reno", "carinox") else ""))
    ax.set_title(method)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_to_dir(adapter, metadata: list[dict], reward_spec, method: str, out, *, budget=None, seed: int = 0,
               guidance: float = 3.0, num_steps: int = 20, chunk: int = 32, judge: bool = True,
               **options) -> dict:
    """The CLI's batch: prompts in chunks of ``chunk`` (a progress bar over prompts), each chunk optimised with
    ``optimize`` (prompt i keeps index i, so its seeds do not depend on the chunking); writes ``images/NNNN.png``,
    ``before_after.png`` (the base sample of the same seed vs the result), ``reward_curve.png`` and
    ``result.json``. ShapeWorld records (``include``) are also judged before and after by every judge."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from flowalign.rewards import to_uint8

    out = Path(out)
    chunk = _positive_int("batch size (prompts per batch)", chunk)
    if out.exists() and not out.is_dir():
        raise NoiseOptError(f"--out {out} exists and is not a directory")
    reward = resolve_reward(reward_spec)
    if isinstance(options.get("category_rewards"), Mapping):
        options["category_rewards"] = {c: resolve_reward(r) for c, r in options["category_rewards"].items()}
    prompts = [m["prompt"] for m in metadata]
    has_meta = all("include" in m for m in metadata)
    meta_arg = metadata if has_meta else None
    results, before, r_before = [], [], []
    bar = tqdm(total=len(prompts), desc=f"optimize-noise ({method})", unit="prompt", disable=len(prompts) < 2)
    for s in range(0, len(prompts), chunk):
        sl = slice(s, s + chunk)
        res = optimize(adapter, prompts[sl], reward, method, budget, seed,
                       metadata=meta_arg[sl] if meta_arg else None, guidance=guidance, num_steps=num_steps,
                       indices=range(s, min(s + chunk, len(prompts))), **options)
        _, img0 = base_samples(adapter, prompts[sl], seed, range(s, s + len(res.prompts)), guidance, num_steps)
        before.append(img0)  # the base sample of the same seed (not counted in the method's nfe)
        with torch.no_grad():
            r_before.append(reward(img0, prompts[sl], meta_arg[sl] if meta_arg else None)["reward"].float().cpu())
        results.append(res)
        bar.update(len(res.prompts))
    bar.close()
    images = torch.cat([r.images for r in results])
    before = torch.cat(before)
    r_before = torch.cat(r_before)
    r_after = torch.cat([r.rewards["reward"].float().cpu() for r in results])
    traj = torch.cat([r.trajectory for r in results], 1) if len({r.trajectory.shape[0] for r in results}) == 1 \
        else results[0].trajectory
    (out / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, a in enumerate(to_uint8(images)):
        Image.fromarray(a).save(out / "images" / f"{i:04d}.png")
    save_before_after(before, images, prompts, r_before, r_after, out / "before_after.png")
    save_reward_curve(traj, results[0].method, out / "reward_curve.png", float(r_before.mean()))
    summary = {
        "method": results[0].method, "reward": repr(reward), "options": _jsonable(options), "seed": seed,
        "guidance": guidance, "num_steps": num_steps, "budget": budget,
        "nfe": int(sum(r.nfe for r in results)), "nfe_per_prompt": sum(r.nfe for r in results) / len(prompts),
        "seconds": sum(r.seconds for r in results),
        "seconds_per_prompt": sum(r.seconds for r in results) / len(prompts),
        "peak_memory_mb": max(r.peak_memory_mb for r in results),
        "reward_before_mean": float(r_before.mean()), "reward_after_mean": float(r_after.mean()),
        "info": [_jsonable(r.info) for r in results],
        "trajectory_mean": [float(x) for x in torch.nanmean(traj, 1)],
        "per_prompt": [{"prompt": p, "image": f"images/{i:04d}.png", "reward_before": float(r_before[i]),
                        "reward_after": float(r_after[i]),
                        "trajectory": [float(x) for x in traj[:, i]] if traj.shape[1] == len(prompts) else None}
                       for i, p in enumerate(prompts)],
    }
    if judge and has_meta:
        from flowalign.eval.judges import HEADLINE, judge_all

        jb, ja = judge_all(metadata, to_uint8(before)), judge_all(metadata, to_uint8(images))
        summary["judges"] = {"headline": HEADLINE,
                             "before": {j: v["overall"] for j, v in jb["judges"].items()},
                             "after": {j: v["overall"] for j, v in ja["judges"].items()}}
        for i, rec in enumerate(summary["per_prompt"]):
            rec["verdicts_before"] = jb["per_image"][i]["verdicts"]
            rec["verdicts_after"] = ja["per_image"][i]["verdicts"]
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    return summary
