"""Pieces the SD3, FLUX, SD1.5 and SDXL adapters share (helper classes mixed in; no adapter inherits from another):

- ``PolicyStore``: the named policies of an adapter ("reference", "old", "ema", ...):
  a frozen module copy for full fine-tuning, a copy of the LoRA tensors (swapped in by pointer) for a LoRA run, or
  nothing for a LoRA run's reference (adapters disabled);
- ``DDPMView``: the flow view of a DDPM (epsilon / v-prediction) model. A VP latent x_vp = sqrt(ab) x0 + sqrt(1-ab)
  eps, divided by sqrt(ab) + sqrt(1-ab), is the rectified-flow latent x = (1 - s) x0 + s eps at
  s = sqrt(1-ab) / (sqrt(ab) + sqrt(1-ab)) (``samplers.alpha_bar_to_sigma``). So an SD1.5 / SDXL adapter hands out
  flow sigmas and flow velocities, and every flow kernel, the forward-process losses and ReNO's Euler preview run
  on it unchanged; DDIM (eta = 0) in these coordinates is exactly the Euler step of the flow ODE.
- LoRA helpers: which target names a module has (``UNET_LORA_TARGETS`` for the UNets), a GPU-options helper, the
  memoised prompt encoding (``cached_cond``), the UNets' DDIM scheduler (``ddim_scheduler``);
- ``DenoiserTraining``: LoRA / full fine-tuning and the named-policy methods over ``self.denoiser``, and
  ``save_trained`` / ``load_trained`` (a run's ``final/`` or checkpoint, UNet or transformer);
- ``DDPMFlowSteps``: the UNet adapters' set-up, the flow-view ``predict`` and ``step`` (and the epsilon / v
  conversions).
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from flowalign import samplers

from .base import Cond


def present_targets(module: torch.nn.Module, targets) -> list[str]:
    """The LoRA target names (last path component, or ``to_out.0``) that exist in ``module``."""
    names = set()
    for n, _ in module.named_modules():
        names.add("to_out.0" if n.endswith("to_out.0") else n.split(".")[-1])
    return [t for t in targets if t in names]


class PolicyStore:
    """Named policies of one trainable module. ``module()`` returns the adapter's current denoiser, ``lora()`` whether
    a LoRA adapter is attached (both callables: the adapter may swap its module on ``load_trained``)."""

    def __init__(self, module, lora):
        self._module, self._lora = module, lora
        self.policies: dict[str, torch.nn.Module | list[torch.Tensor] | None] = {}
        self.active: str | None = None

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self._module().parameters() if p.requires_grad]

    def add(self, name: str) -> None:
        if name in self.policies:
            return
        if name == "reference" and self._lora():
            self.policies[name] = None
        elif self._lora():
            self.policies[name] = [p.detach().clone() for p in self.trainable()]
        else:
            self.policies[name] = copy.deepcopy(self._module()).requires_grad_(False).eval()

    def tensors(self, name: str) -> list[torch.Tensor]:
        pol = self.policies.get(name, "missing")
        if pol is None or isinstance(pol, str):
            raise RuntimeError(f"policy {name!r} has no weights of its own (known: {sorted(self.policies)})")
        return list(pol.parameters()) if isinstance(pol, torch.nn.Module) else pol

    @torch.no_grad()
    def lerp(self, name: str, weight: float) -> None:
        live = self.trainable() if self._lora() else list(self._module().parameters())
        torch._foreach_lerp_(self.tensors(name), [p.detach() for p in live], float(weight))

    def model(self, module: torch.nn.Module | None) -> torch.nn.Module:
        """The module ``predict`` runs: the active named policy's copy, the plain module (LoRA tensors swapped in, or
        adapters disabled), or the trainer's wrapped module / the adapter's own."""
        pol = self.policies.get(self.active) if self.active else None
        if isinstance(pol, torch.nn.Module):
            return pol
        if self.active is not None:
            return self._module()
        return module if module is not None else self._module()

    @contextlib.contextmanager
    def use(self, name: str):
        if name not in self.policies:
            raise RuntimeError(f"no policy {name!r}: call adapter.add_policy({name!r}) before training "
                               f"(known: {sorted(self.policies)})")
        if self.active is not None:
            raise RuntimeError(f"policy({name!r}) inside policy({self.active!r})")
        pol = self.policies[name]
        swap = isinstance(pol, list)
        params = self.trainable() if swap else []
        mod = self._module()
        if pol is None:
            mod.disable_adapters()
        elif swap:
            for p, s in zip(params, pol):
                p.data, s.data = s.data, p.data
        self.active = name
        try:
            yield
        finally:
            self.active = None
            if pol is None:
                mod.enable_adapters()
            elif swap:
                for p, s in zip(params, pol):
                    p.data, s.data = s.data, p.data

    def reference(self):
        if "reference" not in self.policies:
            if not self._lora():
                raise RuntimeError("no reference model: call adapter.add_policy('reference') before training")
            self.add("reference")
        return self.use("reference")


class DDPMView:
    """The flow view of a DDPM scheduler's alphas_cumprod (see the module docstring).

    ``sigmas(timesteps)``: flow sigmas of a DDIM schedule (T+1,), the last one that of the scheduler's final
    alpha_bar. ``lookup(sigma)``: per-sample (model timestep, alpha_bar) for flow sigmas: the exact table entry when
    sigma is one of the training timesteps' (the schedule's values), otherwise a continuous timestep interpolated on
    the table and alpha_bar from the closed form; sigmas above the top timestep's are clamped to it (the model never
    saw less signal)."""

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float):
        ab = alphas_cumprod.double().cpu()
        self.ab = ab
        self.final_ab = float(final_alpha_cumprod)
        self.table = samplers.alpha_bar_to_sigma(ab).float()          # (N,) increasing in t
        self.final_sigma = float(samplers.alpha_bar_to_sigma(torch.tensor(self.final_ab, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])

    def sigmas(self, timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps).long().cpu()
        return torch.cat([self.table[t], torch.tensor([self.final_sigma], dtype=torch.float32)])

    def lookup(self, sigma, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1).expand(batch).contiguous()
        s = s.clamp(max=float(self.table[-1]))
        idx = torch.searchsorted(self.table, s).clamp(max=len(self.table) - 1)
        exact = self.table[idx] == s
        lo = (idx - 1).clamp(min=0)
        t_lo, t_hi = self.table[lo].double(), self.table[idx].double()
        frac = torch.where(t_hi > t_lo, (s.double() - t_lo) / (t_hi - t_lo), torch.zeros_like(t_hi)).clamp(0, 1)
        t_cont = lo.double() + frac * (idx - lo).double()
        t = torch.where(exact, idx.double(), t_cont)
        ab = torch.where(exact, self.ab[idx], samplers.sigma_to_alpha_bar(s.double()))
        final = s == self.final_sigma  # a sigma_next of the last step: the scheduler's final alpha_bar
        ab = torch.where(final, torch.full_like(ab, self.final_ab), ab)
        return t.float().to(device), ab.float().to(device)


def vp_scale(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sqrt(ab) + sqrt(1 - ab): x_vp = x_flow * vp_scale."""
    return alpha_bar.sqrt() + (1 - alpha_bar).sqrt()


def apply_gpu_options(pipe, denoiser, *, attention: str | None = None, vae_slicing: bool = False,
                      vae_tiling: bool = False) -> list[str]:
    """Memory / speed options for real GPUs, each guarded (a missing feature is a warning, not a failure).
    ``attention``: "sdpa" (PyTorch's scaled-dot-product attention; the diffusers default on torch 2) or "xformers"
    (needs the ``xformers`` package). Untested here (no GPU); returns what was enabled."""
    on = []
    if attention == "xformers":
        import importlib.util

        try:
            if importlib.util.find_spec("xformers") is None:
                raise ImportError("the xformers package is not installed")
            denoiser.enable_xformers_memory_efficient_attention()
            on.append("xformers")
        except Exception as e:  # not installed, or no CUDA build
            warnings.warn(f"xformers attention not enabled ({type(e).__name__}: {e}); using SDPA")
    elif attention not in (None, "sdpa"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")
    for flag, name in ((vae_slicing, "enable_slicing"), (vae_tiling, "enable_tiling")):
        if flag:
            fn = getattr(pipe.vae, name, None)
            if fn is None:
                warnings.warn(f"this VAE has no {name}()")
            else:
                fn()
                on.append(name)
    return on


def save_denoiser_trained(adapter, directory, pipeline: str, part: str) -> None:
    """An adapter's trained weights: LoRA in the diffusers format of ``diffusers.<pipeline>`` (its
    ``load_lora_weights`` reads it back, with the rank / alpha metadata travelling with the weights), or the full
    denoiser in ``<part>/`` (``part``: "unet" or "transformer", also the adapter's attribute and the pipeline's
    component name)."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if adapter.lora_config is not None:
        import diffusers

        getattr(diffusers, pipeline).save_lora_weights(
            str(directory), **{f"{part}_lora_layers": adapter.lora_state_dict(),
                               f"{part}_lora_adapter_metadata": adapter.lora_config.to_dict()})
    else:
        getattr(adapter, part).save_pretrained(str(directory / part))


def load_denoiser_trained(adapter, directory, part: str, model_class: str) -> None:
    """Apply what ``save_denoiser_trained`` wrote (LoRA weights, or a full ``<part>/`` loaded as
    ``diffusers.<model_class>``), or a full fine-tuning run's checkpoint directory (``checkpoints/iter_N``)."""
    from pathlib import Path

    from flowalign import checkpoint

    from .base import ModelLoadError

    directory = Path(directory)
    current = getattr(adapter, part)
    if checkpoint.is_checkpoint(directory):
        # a trainer checkpoint: the trainable weights of a full fine-tuning run
        weights = checkpoint.load_weights(directory)
        if any("lora_" in k for k in weights):
            raise ModelLoadError(f"{directory} is a LoRA training checkpoint: evaluate the run's final/ directory, "
                                 f"or resume the run to write one")
        res = current.load_state_dict(weights, strict=False)
        if res.unexpected_keys or any(k.endswith(("weight", "bias")) for k in res.missing_keys):
            raise ModelLoadError(f"{directory}: checkpoint weights do not fit this {part} "
                                 f"({len(res.unexpected_keys)} unexpected, {len(res.missing_keys)} missing)")
    elif (directory / part).is_dir():
        import diffusers

        model = getattr(diffusers, model_class).from_pretrained(str(directory / part), torch_dtype=current.dtype)
        model = model.to(adapter.device).eval().requires_grad_(False)
        setattr(adapter, part, model)
        setattr(adapter.pipe, part, model)
    elif directory.is_dir() and any(directory.glob("*.safetensors")):
        adapter.pipe.load_lora_weights(str(directory))
    else:
        raise ModelLoadError(f"no trained weights in {directory}: expected {directory}/{part}/ (full fine-tuning) "
                             f"or LoRA .safetensors (a run's final/ directory)")


class DenoiserTraining:
    """What every adapter built on a ``PolicyStore`` does the same way with its denoiser (``self.denoiser``: the
    UNet or the transformer), as methods: LoRA or full fine-tuning, gradient checkpointing, and the named policies
    (``self._pol``). A helper class of this module, not an adapter: no adapter inherits from another. Each adapter
    sets ``LORA_TARGETS`` (class attribute ``lora_targets``), ``trained_format`` (the diffusers pipeline class whose
    LoRA format ``save_trained`` writes, the denoiser's attribute / folder name, its diffusers model class),
    ``self.lora_config`` and ``self._pol``."""

    lora_targets: tuple = ()

    def add_lora(self, rank: int = 32, alpha: float = 64, targets=None, init: str | bool = "gaussian"):
        from peft import LoraConfig

        module = self.denoiser
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                      target_modules=present_targets(module, targets or self.lora_targets))
        module.requires_grad_(False)
        module.add_adapter(self.lora_config)
        return self.trainable_parameters()

    def full_finetune(self):
        self.denoiser.requires_grad_(True)
        return list(self.denoiser.parameters())

    def trainable_parameters(self):
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self):
        self.denoiser.enable_gradient_checkpointing()

    # named policies (the contract: pipelines/base.py)
    def add_policy(self, name: str) -> None:
        """Keep a policy besides the trained one, initialised to the current weights: ``"reference"`` (the frozen
        start: for a LoRA run the adapters disabled, nothing stored) or any other name (e.g. ``"old"``: moved with
        ``snapshot_policy`` / ``lerp_policy``). Full fine-tuning keeps a frozen module copy; a LoRA run keeps a copy
        of the LoRA tensors only, swapped in for that policy's forwards (a second adapter's worth of memory)."""
        self._pol.add(name)

    def policy_tensors(self, name: str) -> list[torch.Tensor]:
        """The weights of a named policy that has its own (not a LoRA run's reference), in the order of the
        trained parameters: for checkpoints (read, or ``copy_`` into them to restore)."""
        return self._pol.tensors(name)

    @torch.no_grad()
    def snapshot_policy(self, name: str) -> None:
        """Set a named policy to the current trained weights."""
        self._pol.lerp(name, 1.0)

    @torch.no_grad()
    def lerp_policy(self, name: str, weight: float) -> None:
        """policy <- policy + weight x (current - policy) (EMA of the trained weights with decay 1 - weight)."""
        self._pol.lerp(name, weight)

    def policy(self, name: str):
        """Inside, ``predict`` uses the named policy (see ``add_policy``); use it under no_grad."""
        return self._pol.use(name)

    def reference(self):
        """Inside, ``predict`` uses the reference model: LoRA disabled, or a frozen copy (full fine-tuning)."""
        return self._pol.reference()

    def freeze_reference(self):
        """Keep the current weights as the reference (``add_policy('reference')``)."""
        self._pol.add("reference")

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    def save_trained(self, directory) -> None:
        """LoRA weights in the diffusers format (the stock pipeline's ``load_lora_weights(directory)`` applies them,
        with the rank / alpha metadata), or the full ``unet/`` / ``transformer/`` (``trained_format``)."""
        pipeline, part, _ = self.trained_format
        save_denoiser_trained(self, directory, pipeline, part)

    def load_trained(self, directory) -> None:
        """Apply what ``save_trained`` wrote (a run's ``final/``: LoRA weights, or the full denoiser), or a full
        fine-tuning run's checkpoint directory (``checkpoints/iter_N``)."""
        _, part, model_class = self.trained_format
        load_denoiser_trained(self, directory, part, model_class)


def cached_cond(cache: dict | None, prompts: list[str], negative: str | None, make) -> Cond:
    """``make()`` (an adapter's prompt encoding), memoised in ``cache`` by (prompts, negative) when the adapter was
    built with ``cache_text=True`` (``cache`` a dict), computed every time otherwise (``cache`` None)."""
    if cache is None:
        return make()
    key = (tuple(prompts), negative)
    if key not in cache:
        cache[key] = make()
    return cache[key]


# the UNet's attention projections (self- and cross-attention), as the diffusers LoRA training scripts use
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def ddim_scheduler(config):
    """The DDIM scheduler the UNet adapters sample with: the checkpoint's betas and prediction type, trailing
    spacing, no clipping or thresholding (the stock SD configs set neither)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, thresholding=False)


class DDPMFlowSteps:
    """The flow view of a DDPM adapter (SD1.5, SDXL): its set-up from a pipeline (``_setup_unet``); the UNet's
    device, size and latent shape; x_T and the schedule in flow coordinates; the UNet's native output with CFG
    (``predict_native``); conversions of the native epsilon / v output at VP latents; ``predict`` (the flow velocity
    eps - x0 at flow latents) and ``step`` (DDIM with eta on the flow view, or a flow kernel). A helper class, not an
    adapter; the adapter provides ``_call(model, x, t, cond, negative)`` (the UNet on the unconditional rows, the
    conditional ones, or both) and ``kernels``."""

    def _setup_unet(self, pipe, resolution: int | None, cache_text: bool, encoders, upcast_vae: bool = False) -> None:
        """What both UNet adapters' ``__init__`` do: the DDIM scheduler on the checkpoint's config, the prediction
        type checked, frozen VAE / text ``encoders``, the flow view, no LoRA yet, the named-policy store and the
        optional prompt-embedding cache. ``upcast_vae``: a float16 VAE whose config says ``force_upcast`` decodes in
        float32, as the stock SDXL pipeline does (GPU path, untested here)."""
        from .base import ModelLoadError

        self.pipe = pipe
        self.resolution = resolution
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = ddim_scheduler(pipe.scheduler.config)
        self.scheduler = pipe.scheduler
        self.prediction_type = self.scheduler.config.prediction_type  # "epsilon" or "v_prediction"
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.unet = pipe.unet
        self.vae = pipe.vae
        for m in (pipe.vae, *encoders):
            if m is not None:
                m.requires_grad_(False).eval()
        if upcast_vae and self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
        self.view = DDPMView(self.scheduler.alphas_cumprod, float(self.scheduler.final_alpha_cumprod))
        self.lora_config = None
        self._pol = PolicyStore(lambda: self.unet, lambda: self.lora_config is not None)
        self._text_cache: dict | None = {} if cache_text else None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def default_size(self) -> int:
        return self.resolution or self.unet.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.default_size, width or self.default_size
        f = self.pipe.vae_scale_factor
        m = f * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be a multiple of {m}")
        return (self.unet.config.in_channels, h // f, w // f)

    def init_noise(self, n: int, generator=None, height=None, width=None) -> torch.Tensor:
        """x_T: the stock pipeline's draw z (one randn of the batch, or one per generator), the VP latent at the top
        timestep, in flow coordinates (z / (sqrt(ab_top) + sqrt(1 - ab_top)))."""
        from diffusers.utils.torch_utils import randn_tensor

        z = randn_tensor((n, *self.latent_shape(height, width)), generator=generator, device=self.device,
                         dtype=torch.float32) * self.scheduler.init_noise_sigma
        return z * self.init_noise_std

    @property
    def init_noise_std(self) -> float:
        """The std of x_T in flow coordinates, 1 / (sqrt(ab_top) + sqrt(1 - ab_top)) (about 0.94 for SD's betas):
        ReNO's norm prior is on x_T / init_noise_std, the standard normal draw."""
        return float(1 / vp_scale(self.view.ab[-1]))

    def schedule(self, num_steps: int) -> torch.Tensor:
        sch = copy.deepcopy(self.scheduler)
        sch.set_timesteps(num_steps)
        return self.view.sigmas(sch.timesteps)

    def _model(self, module):
        return self._pol.model(module)

    def predict_native(self, x_vp: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float = 1.0,
                       module: torch.nn.Module | None = None, cfg_grad: str = "both") -> torch.Tensor:
        """The UNet's output (epsilon or v) at VP latents and (B,) timesteps, CFG ``u + g (c - u)`` inside."""
        if cfg_grad not in ("both", "cond"):
            raise ValueError(f"cfg_grad must be 'both' or 'cond', got {cfg_grad!r}")
        model = self._model(module)
        dt = next(self.unet.parameters()).dtype
        x_in = x_vp.to(dt)
        use_cfg = guidance > 1.0 and cond.neg_embeds is not None
        if use_cfg and cfg_grad == "cond" and torch.is_grad_enabled():
            with torch.no_grad():
                plain = self.unet if self._pol.active is None else model
                u = self._call(plain, x_in, t, cond, negative=True).float()
            c = self._call(model, x_in, t, cond, negative=False).float()
            return u + guidance * (c - u)
        if use_cfg:
            u, c = self._call(model, torch.cat([x_in, x_in]), torch.cat([t, t]), cond, negative=None).float().chunk(2)
            return u + guidance * (c - u)
        return self._call(model, x_in, t, cond, negative=False).float()

    # conversions of the native output at VP latents (a = sqrt(ab), b = sqrt(1 - ab))
    def to_eps(self, x_vp, out, alpha_bar) -> torch.Tensor:
        ab = samplers._bc(alpha_bar, x_vp)
        if self.prediction_type == "epsilon":
            return out
        return ab.sqrt() * out + (1 - ab).sqrt() * x_vp

    def to_x0(self, x_vp, out, alpha_bar) -> torch.Tensor:
        ab = samplers._bc(alpha_bar, x_vp)
        if self.prediction_type == "epsilon":
            return (x_vp - (1 - ab).sqrt() * out) / ab.sqrt()
        return ab.sqrt() * x_vp - (1 - ab).sqrt() * out

    def to_velocity(self, x_vp, out, alpha_bar) -> torch.Tensor:
        """The flow velocity eps - x0 of the native output."""
        return self.to_eps(x_vp, out, alpha_bar) - self.to_x0(x_vp, out, alpha_bar)

    def _predictions(self, x, sigma, cond, guidance, module, cfg_grad):
        """(x0, eps, alpha_bar) at flow latents x and flow sigma(s)."""
        x = x.float()
        t, ab = self.view.lookup(sigma, x.shape[0], x.device)
        x_vp = x * samplers._bc(vp_scale(ab), x)
        out = self.predict_native(x_vp, t, cond, guidance, module=module, cfg_grad=cfg_grad)
        return self.to_x0(x_vp, out, ab), self.to_eps(x_vp, out, ab), ab

    def predict(self, x: torch.Tensor, sigma, cond: Cond, guidance: float = 1.0, module: torch.nn.Module | None = None,
                cfg_grad: str = "both") -> torch.Tensor:
        """The flow velocity eps - x0 at flow latents x and flow sigma(s) (see the module docstring); ``module`` /
        ``cfg_grad`` as in the SD3 adapter's ``predict``; inside ``policy(name)`` the named policy runs."""
        x0, eps, _ = self._predictions(x, sigma, cond, guidance, module, cfg_grad)
        return eps - x0

    def step(self, x: torch.Tensor, sigmas: torch.Tensor, i: int, cond: Cond, guidance: float = 1.0,
             noise_level: float = 0.0, next_x: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             kernel: str = "ddim", noise_block: int = 1, module: torch.nn.Module | None = None,
             cfg_grad: str = "both") -> samplers.StepOutput:
        """Step i (sigma_i -> sigma_{i+1}): DDIM with eta = noise_level (``kernel="ddim"``, and every ODE step), or a
        flow kernel on the flow view ("sde", "cps"). Samples when next_x is None, otherwise scores it."""
        x0, eps, ab = self._predictions(x, sigmas[i], cond, guidance, module, cfg_grad)
        if noise_level == 0 or kernel == "ddim":
            if noise_block != 1:
                raise ValueError("noise_block > 1 needs kernel 'sde'")
            _, abp = self.view.lookup(sigmas[i + 1], x.shape[0], x.device)
            return samplers.ddim_flow_step(x0, eps, sigmas[i], sigmas[i + 1], noise_level, noise=noise, next_x=next_x,
                                           alpha_bar=ab, alpha_bar_next=abp)
        v = eps - x0
        return samplers.velocity_kernel_step(x, v, sigmas, i, noise_level, kernel, self.family, self.kernels,
                                             noise=noise, next_x=next_x, noise_block=noise_block)
