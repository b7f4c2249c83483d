"""Adapter for FLUX.1 (``FluxPipeline``: dev, schnell): rectified flow, velocity prediction, a transformer on packed
2x2 latent patches, CLIP (pooled) + T5 (sequence) text encoders.

- Latents are kept unpacked, (B, C, H/8, W/8) as the VAE makes them (so block noise, ReNO and every sampler see an
  image-shaped tensor); ``predict`` packs them into the transformer's (B, HW/4, 4C) tokens and unpacks the velocity.
- ``schedule(T)``: the stock pipeline's sigmas, linspace(1, 1/T, T) shifted by the dynamic ``mu`` that
  ``calculate_shift`` derives from the image's token count (the checkpoint's base/max shift), then 0.
- Guidance: a checkpoint with ``guidance_embeds`` (FLUX.1-dev) takes ``guidance`` as its distilled guidance
  embedding (one forward, no CFG batch: flow_grpo's FLUX setting, 3.5 in the stock pipeline); one without (schnell)
  runs true CFG ``u + g (c - u)`` when guidance > 1 and the cond has negatives (the stock ``true_cfg_scale``).
- T5 optional: a folder without ``text_encoder_2`` (or ``load_t5=False``) encodes the sequence as zeros of
  ``max_sequence_length`` tokens (only the pooled CLIP embedding carries the prompt: a memory saver for experiments,
  not the model's quality).
- ``step``: the flow SDE / CPS kernels as SD3, or DDIM with eta on the flow view (``kernel="ddim"``).

GPU options (bf16 as the stock model, ``attention="xformers"``, VAE slicing / tiling, ``cache_text``,
``enable_gradient_checkpointing()``) are written and guarded but untested here (CPU only).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowalign import samplers

from ._shared import apply_gpu_options, cached_cond, DenoiserTraining, PolicyStore
from .base import Cond, ModelLoadError, check_model_path

# attention projections of the double-stream blocks (image and text streams) and the single-stream blocks
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FluxAdapter(DenoiserTraining):
    family = "flux"
    trained_format = ("FluxPipeline", "transformer", "FluxTransformer2DModel")
    lora_targets = LORA_TARGETS
    prediction_type = "flow"
    supports_cfg = True
    kernels = ("sde", "cps", "ddim")
    default_kernel = "sde"

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int | None = None,
                 cache_text: bool = False):
        self.pipe = pipe
        self.resolution = resolution
        pipe.set_progress_bar_config(disable=True)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            if m is not None:
                m.requires_grad_(False).eval()
        # T5 tokens: the stock default 512, capped by the tokenizer's own maximum
        tok_max = getattr(pipe.tokenizer_2, "model_max_length", 512) if pipe.tokenizer_2 is not None else 512
        self.max_sequence_length = max_sequence_length or min(512, int(tok_max))
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.lora_config = None
        self._pol = PolicyStore(lambda: self.transformer, lambda: self.lora_config is not None)
        self._text_cache: dict | None = {} if cache_text else None

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", load_t5: bool = True,
                        attention: str | None = None, vae_slicing: bool = False, vae_tiling: bool = False,
                        **kw) -> "FluxAdapter":
        from diffusers import FluxPipeline

        path = check_model_path(path)
        extra = {}
        if not load_t5 or (Path(path).is_dir() and not (Path(path) / "text_encoder_2").is_dir()):
            extra = dict(text_encoder_2=None, tokenizer_2=None)
        try:
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype, **extra)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load a FLUX pipeline from {path}: {str(e).splitlines()[0]}") from None
        ad = cls(pipe.to(device), **kw)
        apply_gpu_options(pipe, ad.transformer, attention=attention, vae_slicing=vae_slicing, vae_tiling=vae_tiling)
        return ad

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def default_size(self) -> int:
        return self.resolution or 128 * self.pipe.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.default_size, width or self.default_size
        m = self.pipe.vae_scale_factor * 2
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be a multiple of {m}")
        return (self.transformer.config.in_channels // 4, h // self.pipe.vae_scale_factor,
                w // self.pipe.vae_scale_factor)

    # ------------------------------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def _encode(self, prompts: list[str]):
        if self.pipe.text_encoder_2 is not None:
            pe, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
            return pe, pooled
        pooled = self.pipe._get_clip_prompt_embeds(prompt=prompts, device=self.device)
        pe = torch.zeros(len(prompts), self.max_sequence_length, self.transformer.config.joint_attention_dim,
                         device=self.device, dtype=pooled.dtype)
        return pe, pooled

    @torch.no_grad()
    def encode(self, prompts: list[str], negative: str | None = "") -> Cond:
        prompts = list(prompts)
        return cached_cond(self._text_cache, prompts, negative, lambda: self._encode_cond(prompts, negative))

    def _encode_cond(self, prompts: list[str], negative: str | None) -> Cond:
        pe, pooled = self._encode(prompts)
        npe = npp = None
        if negative is not None and not self.guidance_embeds:  # dev: guidance is embedded, no negative branch
            npe, npp = self._encode([negative] * len(prompts))
        return Cond(pe, pooled, npe, npp)

    def init_noise(self, n: int, generator=None, height=None, width=None) -> torch.Tensor:
        """x_T as the stock pipeline draws it (randn of the unpacked latent shape, then packed there)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *self.latent_shape(height, width)), generator=generator, device=self.device,
                            dtype=torch.float32)

    def schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        import copy

        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape(height, width)
        c = self.pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sch = copy.deepcopy(self.pipe.scheduler)
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return sch.sigmas.float().cpu().clone()

    # ------------------------------------------------------------------------------------------ the model
    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)

    @staticmethod
    def unpack(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, D = t.shape
        return t.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)

    def _forward(self, model, x_packed, timestep, embeds, pooled, img_ids, guidance_vec):
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x_packed.device, dtype=x_packed.dtype)
        return model(hidden_states=x_packed, timestep=timestep, guidance=guidance_vec, pooled_projections=pooled,
                     encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def predict(self, x: torch.Tensor, sigma, cond: Cond, guidance: float = 1.0, module: torch.nn.Module | None = None,
                cfg_grad: str = "both") -> torch.Tensor:
        """Velocity at (x, sigma), x unpacked (B, C, H, W). Guidance as in the module docstring; ``module`` /
        ``cfg_grad`` as in the SD3 adapter; inside ``policy(name)`` the named policy runs."""
        if cfg_grad not in ("both", "cond"):
            raise ValueError(f"cfg_grad must be 'both' or 'cond', got {cfg_grad!r}")
        model = self._pol.model(module)
        B, _, H, W = x.shape
        dt = self.transformer.dtype
        xp = self.pack(x.to(dt))
        img_ids = self.pipe._prepare_latent_image_ids(B, H // 2, W // 2, x.device, dt)
        # the stock pipeline's timestep: sigma * 1000 (its scheduler's timesteps), divided by 1000
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * 1000).expand(B).to(dt) / 1000
        g = torch.full((B,), float(guidance), device=x.device, dtype=torch.float32) if self.guidance_embeds else None
        use_cfg = (not self.guidance_embeds) and guidance > 1.0 and cond.neg_embeds is not None
        if use_cfg and cfg_grad == "cond" and torch.is_grad_enabled():
            with torch.no_grad():
                plain = self.transformer if self._pol.active is None else model
                u = self._forward(plain, xp, t, cond.neg_embeds, cond.neg_pooled, img_ids, g).float()
            c = self._forward(model, xp, t, cond.embeds, cond.pooled, img_ids, g).float()
            out = u + guidance * (c - u)
        elif use_cfg:  # two forwards (the stock pipeline's true CFG runs them separately too)
            c = self._forward(model, xp, t, cond.embeds, cond.pooled, img_ids, g).float()
            u = self._forward(model, xp, t, cond.neg_embeds, cond.neg_pooled, img_ids, g).float()
            out = u + guidance * (c - u)
        else:
            out = self._forward(model, xp, t, cond.embeds, cond.pooled, img_ids, g).float()
        return self.unpack(out, H, W)

    def step(self, x: torch.Tensor, sigmas: torch.Tensor, i: int, cond: Cond, guidance: float = 1.0,
             noise_level: float = 0.0, next_x: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             kernel: str = "sde", noise_block: int = 1, module: torch.nn.Module | None = None,
             cfg_grad: str = "both") -> samplers.StepOutput:
        """Step i (sigma_i -> sigma_{i+1}); ODE when noise_level == 0; samples when next_x is None, otherwise scores
        the stored transition."""
        v = self.predict(x, sigmas[i], cond, guidance, module=module, cfg_grad=cfg_grad)
        if noise_level == 0:
            return samplers.ode_step(x, v, sigmas[i], sigmas[i + 1])
        if kernel == "ddim":
            s = samplers._bc(sigmas[i], x.float())
            xf = x.float()
            return samplers.ddim_flow_step(xf - s * v, xf + (1 - s) * v, sigmas[i], sigmas[i + 1], noise_level,
                                           noise=noise, next_x=next_x)
        return samplers.velocity_kernel_step(x, v, sigmas, i, noise_level, kernel, "FLUX", self.kernels, noise=noise,
                                             next_x=next_x, noise_block=noise_block)

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        cfg = self.vae.config
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training
    # add_lora / full_finetune / named policies / save_trained / load_trained: _shared.DenoiserTraining
