"""Samplers as pure tensor math: no models, no schedulers, no state.

Conventions (rectified flow, as in SD3/FLUX): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = noise - x0, and sampling runs sigma from 1 (noise) down to 0 (data), so dt = sigma_next - sigma < 0.
Every function takes per-sample sigmas broadcastable to x (a float or a (B,) tensor).

- ``ode_step``: Euler step of the probability-flow ODE, x' = x + v dt.
- ``flow_sde_step``: Flow-GRPO's reverse-time SDE with the same marginals as the ODE,
      dx = [v + s_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt + s_t dW,   s_t = a * sqrt(sigma / (1 - sigma)),
  discretised by Euler-Maruyama: mean = x + [v + s_t^2/(2 sigma) (x + (1 - sigma) v)] dt, std = s_t sqrt(-dt).
  At sigma = 1 the (1 - sigma) in s_t is replaced by (1 - sigma_cap) (flow_grpo uses sigma_cap = sigmas[1]).
- ``cps_step``: coefficients-preserving sampling (std = sigma_next * sin(a pi / 2)).
- ``ddim_step``: DDIM with eta for epsilon-prediction models (SD1.5/SDXL), with its Gaussian std.
- ``ddim_flow_step``: the same DDIM transition on flow latents (DDPM models in the flow view; ``alpha_bar_to_sigma``).
- ``gaussian_log_prob``: log N(x'; mean, std^2), averaged (default, flow_grpo) or summed over non-batch dims.
- ``gaussian_kl``: the exact KL between two Gaussian steps with the same std, KL = |mu_p - mu_q|^2 / (2 std^2),
  reduced like the log-prob. flow_grpo's "KL" divides by s_t^2 without the |dt| factor, i.e. it equals ours times
  |dt|; beta values do not carry over between the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    next: torch.Tensor            # x at the next (lower) sigma
    mean: torch.Tensor            # mean of the transition
    std: torch.Tensor             # std of the transition (0 for an ODE step), broadcastable to x
    log_prob: torch.Tensor | None  # (B,) log-density of ``next`` under N(mean, std^2); None for an ODE step


def _bc(s, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor of per-sample scalars -> a tensor broadcastable to x, in x's dtype/device."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.view(-1, *([1] * (x.ndim - 1))) if s.ndim else s


def _hi(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Compute in float32 at least (bf16/fp16 overflow in these formulas); float64 stays float64."""
    dt = torch.promote_types(ts[0].dtype, torch.float32)
    return [t.to(dt) for t in ts]


def _reduce(t: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, t.ndim))
    if reduce == "mean":
        return t.mean(dim=dims)
    if reduce == "sum":
        return t.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    std = torch.broadcast_to(std, x.shape)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - LOG_SQRT_2PI
    return _reduce(lp, reduce)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample."""
    std = torch.broadcast_to(std, mean_p.shape)
    return _reduce((mean_p - mean_q) ** 2 / (2 * std ** 2), reduce)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> StepOutput:
    dt = _bc(sigma_next, x) - _bc(sigma, x)
    nxt = x + v * dt
    return StepOutput(next=nxt, mean=nxt, std=torch.zeros_like(dt), log_prob=None)


def flow_sde_std(sigma, noise_level: float, sigma_cap: float | None = None) -> torch.Tensor:
    """s_t = a * sqrt(sigma / (1 - sigma)), with 1 - sigma replaced by 1 - sigma_cap where sigma >= 1."""
    sigma = torch.as_tensor(sigma)
    sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    denom = 1 - sigma
    if sigma_cap is not None:
        denom = torch.where(sigma >= 1, torch.as_tensor(1 - sigma_cap, dtype=sigma.dtype), denom)
    return noise_level * torch.sqrt(sigma / denom)


def step_std(sigmas: torch.Tensor, i: int, noise_level: float, kernel: str = "sde") -> float:
    """The std of step i's Gaussian transition under a kernel: the flow SDE's s_t sqrt(sigma_i - sigma_{i+1})
    (``flow_sde_step``), CPS's sigma_{i+1} sin(a pi / 2) (``cps_step``), or DDIM's with eta = a on flow sigmas
    (``ddim_flow_step``)."""
    sig = torch.as_tensor(sigmas).float().cpu()
    if kernel == "cps":
        return float(sig[i + 1] * math.sin(noise_level * math.pi / 2))
    if kernel == "ddim":
        return ddim_flow_std(sig[i], sig[i + 1], noise_level)
    if kernel != "sde":
        raise ValueError(f"unknown kernel {kernel!r}: 'sde', 'cps' or 'ddim'")
    return float(flow_sde_std(sig[i], noise_level, float(sig[1])) * (sig[i] - sig[i + 1]).sqrt())


def block_project(y: torch.Tensor, f: int) -> torch.Tensor:
    """P y: each f x f spatial block replaced by its mean (an orthogonal projection; identity for f = 1)."""
    if f == 1:
        return y
    if y.shape[-1] % f or y.shape[-2] % f:
        raise ValueError(f"noise_block {f} does not divide the latent size {tuple(y.shape[-2:])}")
    return torch.repeat_interleave(torch.repeat_interleave(
        torch.nn.functional.avg_pool2d(y, f), f, dim=-2), f, dim=-1)


def flow_sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float,
                  sigma_cap: float | None = None, noise: torch.Tensor | None = None,
                  next_x: torch.Tensor | None = None, reduce: str = "mean", noise_block: int = 1) -> StepOutput:
    """One Euler-Maruyama step of the marginal-preserving flow SDE; samples (with ``noise`` or fresh noise) when
    ``next_x`` is None, otherwise scores the given transition. Computed in float32.

    ``noise_block`` f > 1 injects the noise only in the subspace of f x f block-constant latents (diffusion matrix
    s_t^2 P with P the block-mean projection). The score correction is projected the same way,
    drift = v + s_t^2/(2 sigma) P (x + (1 - sigma) v), which keeps the marginals (Fokker-Planck with D = s_t^2 P),
    and the log-prob is the Gaussian density of the step within that subspace (coordinates f * blockmean / std).
    Exploration then lives in H W C / f^2 dimensions instead of H W C: the REINFORCE estimate is less noisy for
    rewards that depend on layout rather than texture."""
    out_dtype = x.dtype
    x, v = _hi(x, v)
    s, s1 = _bc(sigma, x), _bc(sigma_next, x)
    dt = s1 - s
    st = _bc(flow_sde_std(torch.as_tensor(sigma, dtype=x.dtype), noise_level, sigma_cap).to(x.device), x)
    mean = x + (v + st ** 2 / (2 * s) * block_project(x + (1 - s) * v, noise_block)) * dt
    std = st * torch.sqrt(-dt)
    if next_x is None:
        if noise is None:
            noise = torch.randn_like(x)
        next_x = mean + std * block_project(noise.to(x.dtype), noise_block)
    next_x = next_x.to(x.dtype)
    if noise_block == 1:
        lp = gaussian_log_prob(next_x.detach(), mean, std, reduce)
    else:
        z = noise_block * torch.nn.functional.avg_pool2d(next_x.detach() - mean, noise_block)
        lp = gaussian_log_prob(z, torch.zeros_like(z), torch.broadcast_to(std, x.shape)[..., ::noise_block, ::noise_block],
                               reduce)
    return StepOutput(next=next_x.to(out_dtype), mean=mean, std=std, log_prob=lp)


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float,
             noise: torch.Tensor | None = None, next_x: torch.Tensor | None = None, reduce: str = "mean") -> StepOutput:
    """Coefficients-preserving sampling: x0 = x - sigma v, x1 = x + (1 - sigma) v, std = sigma' sin(a pi/2),
    mean = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1."""
    x, v = _hi(x, v)
    s, s1 = _bc(sigma, x), _bc(sigma_next, x)
    std = s1 * math.sin(noise_level * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    mean = (1 - s1) * x0 + torch.sqrt((s1 ** 2 - std ** 2).clamp_min(0)) * x1
    if next_x is None:
        next_x = mean + std * (torch.randn_like(x) if noise is None else noise.to(x.dtype))
    lp = gaussian_log_prob(next_x.detach().to(x.dtype), mean, std.clamp_min(1e-12), reduce)
    return StepOutput(next=next_x, mean=mean, std=std, log_prob=lp)


def velocity_kernel_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int, noise_level: float,
                         kernel: str, family: str, kernels, noise: torch.Tensor | None = None,
                         next_x: torch.Tensor | None = None, noise_block: int = 1) -> StepOutput:
    """A stochastic step sigma_i -> sigma_{i+1} from a velocity by one of the flow kernels: ``cps`` or ``sde``
    (Flow-GRPO's, its std capped at sigma_1). What every adapter's ``step`` shares once its own cases (ODE, DDIM)
    are handled; any other kernel is refused with the family's list of ``kernels``."""
    if kernel == "cps":
        return cps_step(x, v, sigmas[i], sigmas[i + 1], noise_level, noise=noise, next_x=next_x)
    if kernel != "sde":
        raise ValueError(f"unknown kernel {kernel!r} for {family}: one of {', '.join(kernels)}")
    return flow_sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, sigma_cap=float(sigmas[1]), noise=noise,
                         next_x=next_x, noise_block=noise_block)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar, alpha_bar_prev, eta: float,
              noise: torch.Tensor | None = None, next_x: torch.Tensor | None = None, reduce: str = "mean") -> StepOutput:
    """DDIM (Song et al.) for epsilon prediction: x0 = (x - sqrt(1-a) eps)/sqrt(a),
    std = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a'), mean = sqrt(a') x0 + sqrt(1 - a' - std^2) eps."""
    x, eps = _hi(x, eps)
    a, ap = _bc(alpha_bar, x), _bc(alpha_bar_prev, x)
    x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    std = eta * torch.sqrt((1 - ap) / (1 - a)) * torch.sqrt(1 - a / ap)
    mean = torch.sqrt(ap) * x0 + torch.sqrt((1 - ap - std ** 2).clamp_min(0)) * eps
    if eta == 0:
        return StepOutput(next=mean, mean=mean, std=std, log_prob=None)
    if next_x is None:
        next_x = mean + std * (torch.randn_like(x) if noise is None else noise.to(x.dtype))
    lp = gaussian_log_prob(next_x.detach().to(x.dtype), mean, std, reduce)
    return StepOutput(next=next_x, mean=mean, std=std, log_prob=lp)


# ------------------------------------------------------------------------------------------------ DDPM in flow view
# A VP (DDPM) latent x_vp = sqrt(ab) x0 + sqrt(1 - ab) eps, divided by c = sqrt(ab) + sqrt(1 - ab), is the rectified
# flow latent (1 - s) x0 + s eps at s = sqrt(1 - ab) / c. So epsilon / v-prediction models run in the flow engine:
# their adapters hand out flow sigmas and flow velocities, and DDIM with eta is a kernel on flow latents.

def alpha_bar_to_sigma(alpha_bar) -> torch.Tensor:
    """Flow sigma of a DDPM alpha_bar: sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))."""
    ab = torch.as_tensor(alpha_bar)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    return b / (a + b)


def sigma_to_alpha_bar(sigma) -> torch.Tensor:
    """The inverse: ab = (1 - s)^2 / ((1 - s)^2 + s^2)."""
    s = torch.as_tensor(sigma)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)


def ddim_flow_step(x0: torch.Tensor, eps: torch.Tensor, sigma, sigma_next, eta: float,
                   noise: torch.Tensor | None = None, next_x: torch.Tensor | None = None, reduce: str = "mean",
                   alpha_bar=None, alpha_bar_next=None) -> StepOutput:
    """DDIM with eta on flow latents: from the predictions (x0, eps) at sigma, the DDIM transition of ``ddim_step``
    (VP coordinates at alpha_bar(sigma) -> alpha_bar(sigma_next)) expressed in flow coordinates, i.e. its mean and std
    divided by sqrt(ab') + sqrt(1 - ab'). ``alpha_bar`` / ``alpha_bar_next`` override the closed form (an adapter
    passes its scheduler's exact table values). With eta = 0 this is the Euler step of the flow ODE (exact DDIM).
    The log-prob is the Gaussian density in flow coordinates: the VP density plus a constant per step (ratios and
    advantages are unchanged). Samples when ``next_x`` is None, then scores the sample it drew."""
    out_dtype = x0.dtype
    x0, eps = _hi(x0, eps)
    ab = _bc(sigma_to_alpha_bar(torch.as_tensor(sigma, dtype=torch.float64)) if alpha_bar is None else alpha_bar, x0)
    abp = _bc(sigma_to_alpha_bar(torch.as_tensor(sigma_next, dtype=torch.float64)) if alpha_bar_next is None
              else alpha_bar_next, x0)
    std_vp = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt((1 - ab / abp).clamp_min(0))
    mean_vp = torch.sqrt(abp) * x0 + torch.sqrt((1 - abp - std_vp ** 2).clamp_min(0)) * eps
    c = torch.sqrt(abp) + torch.sqrt(1 - abp)
    mean, std = mean_vp / c, std_vp / c
    if eta == 0:
        return StepOutput(next=mean.to(out_dtype), mean=mean, std=std, log_prob=None)
    if next_x is None:
        next_x = mean + std * (torch.randn_like(mean) if noise is None else noise.to(mean.dtype))
    next_x = next_x.to(mean.dtype)
    lp = gaussian_log_prob(next_x.detach(), mean, std, reduce)
    return StepOutput(next=next_x.to(out_dtype), mean=mean, std=std, log_prob=lp)


def ddim_flow_std(sigma, sigma_next, eta: float) -> float:
    """The std of ``ddim_flow_step`` between two flow sigmas (closed-form alpha_bars)."""
    ab = sigma_to_alpha_bar(torch.as_tensor(float(sigma), dtype=torch.float64))
    abp = sigma_to_alpha_bar(torch.as_tensor(float(sigma_next), dtype=torch.float64))
    std_vp = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt((1 - ab / abp).clamp_min(0))
    return float(std_vp / (abp.sqrt() + (1 - abp).sqrt()))
