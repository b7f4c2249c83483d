"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): rectified flow, velocity prediction,
FlowMatchEuler sigmas with the checkpoint's shift, CFG by batch concatenation, optional T5.

The embedded ShapeWorld model is this architecture (two tiny CLIP encoders, no T5).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from flowalign import samplers

from ._shared import DenoiserTraining, PolicyStore
from .base import Cond, ModelLoadError, check_model_path

# attention projections LoRA targets in SD3's joint transformer blocks (flow_grpo's choice)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Adapter(DenoiserTraining):
    family = "sd3"
    prediction_type = "flow"
    supports_cfg = True
    kernels = ("sde", "cps")  # the stochastic steps ``step`` implements (the trainer refuses others)
    trained_format = ("StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel")
    lora_targets = LORA_TARGETS

    def __init__(self, pipe, max_sequence_length: int | None = None, resolution: int | None = None):
        self.pipe = pipe
        self.resolution = resolution  # image side in pixels (default: the transformer's sample_size x VAE factor)
        pipe.set_progress_bar_config(disable=True)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if m is not None:
                m.requires_grad_(False).eval()
        # without T5 the sequence is CLIP tokens only: max_sequence_length 0 adds no padded T5 rows
        self.max_sequence_length = (0 if pipe.text_encoder_3 is None else 256) if max_sequence_length is None \
            else max_sequence_length
        self.lora_config = None
        # named policies besides the trained one (_shared.PolicyStore): a frozen module copy (full fine-tuning), the
        # LoRA tensors of that policy (swapped in for its forwards), or None for a LoRA run's reference
        self._pol = PolicyStore(lambda: self.transformer, lambda: self.lora_config is not None)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", **kw) -> "SD3Adapter":
        from diffusers import StableDiffusion3Pipeline

        path = check_model_path(path)
        extra = {}
        if Path(path).is_dir() and not (Path(path) / "text_encoder_3").is_dir():
            extra = dict(text_encoder_3=None, tokenizer_3=None)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, **extra)
        except OSError as e:
            raise ModelLoadError(f"could not load an SD3 pipeline from {path}: {str(e).splitlines()[0]}") from None
        return cls(pipe.to(device), **kw)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def default_size(self) -> int:
        return self.resolution or self.transformer.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.default_size, width or self.default_size
        f = self.pipe.vae_scale_factor
        if h % (f * self.transformer.config.patch_size) or w % (f * self.transformer.config.patch_size):
            raise ValueError(f"image size {h}x{w} must be a multiple of {f * self.transformer.config.patch_size}")
        side = getattr(self.transformer.config, "pos_embed_max_size", None)  # the positional table's side, in patches
        if side and max(h, w) // (f * self.transformer.config.patch_size) > side:
            raise ValueError(f"image size {h}x{w} is larger than this transformer's positional embedding allows "
                             f"(at most {side * f * self.transformer.config.patch_size} px a side)")
        return (self.transformer.config.in_channels, h // f, w // f)

    # ------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def encode(self, prompts: list[str], negative: str | None = "") -> Cond:
        cfg = negative is not None
        pe, npe, pp, npp = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg,
            negative_prompt=[negative] * len(prompts) if cfg else None, max_sequence_length=self.max_sequence_length,
            device=self.device)
        return Cond(pe, pp, npe if cfg else None, npp if cfg else None)

    def init_noise(self, n: int, generator=None, height=None, width=None) -> torch.Tensor:
        """x_T as the stock pipeline draws it: one randn of the whole batch, or one per sample for a list of
        generators."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *self.latent_shape(height, width)), generator=generator, device=self.device,
                            dtype=torch.float32)

    def schedule(self, num_steps: int) -> torch.Tensor:
        sch = copy.deepcopy(self.pipe.scheduler)
        sch.set_timesteps(num_steps)
        return sch.sigmas.float().cpu().clone()

    def predict(self, x: torch.Tensor, sigma, cond: Cond, guidance: float = 1.0, module: torch.nn.Module | None = None,
                cfg_grad: str = "both") -> torch.Tensor:
        """Velocity at (x, sigma); CFG ``u + g (c - u)`` when guidance > 1 and the cond has negatives.

        ``module``: the module to run for the trained policy (the trainer's accelerate-wrapped transformer, so that
        DDP sees its forwards); default the adapter's own. Inside ``policy(name)`` the named policy runs instead.
        ``cfg_grad``: "both" (gradients through both CFG branches, flow_grpo), or "cond" (the unconditional
        prediction under no_grad: the prompt-agnostic branch is not trained, and the update transfers across CFG
        scales)."""
        if cfg_grad not in ("both", "cond"):
            raise ValueError(f"cfg_grad must be 'both' or 'cond', got {cfg_grad!r}")
        model = self._pol.model(module)
        B = x.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B) * 1000
        use_cfg = guidance > 1.0 and cond.neg_embeds is not None
        if use_cfg and cfg_grad == "cond" and torch.is_grad_enabled():
            with torch.no_grad():
                plain = self.transformer if self._pol.active is None else model
                u = plain(hidden_states=x, timestep=t, encoder_hidden_states=cond.neg_embeds,
                          pooled_projections=cond.neg_pooled, return_dict=False)[0].float()
            c = model(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                      return_dict=False)[0].float()
            return u + guidance * (c - u)
        if use_cfg:
            out = model(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([cond.neg_embeds, cond.embeds]),
                        pooled_projections=torch.cat([cond.neg_pooled, cond.pooled]), return_dict=False)[0]
            u, c = out.float().chunk(2)
            return u + guidance * (c - u)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                     return_dict=False)[0].float()

    def step(self, x: torch.Tensor, sigmas: torch.Tensor, i: int, cond: Cond, guidance: float = 1.0,
             noise_level: float = 0.0, next_x: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             kernel: str = "sde", noise_block: int = 1, module: torch.nn.Module | None = None,
             cfg_grad: str = "both") -> samplers.StepOutput:
        """Step i (sigma_i -> sigma_{i+1}); ODE when noise_level == 0; samples when next_x is None, otherwise
        scores the stored transition (rollout and replay are the same code). ``module`` / ``cfg_grad``: as
        ``predict``."""
        v = self.predict(x, sigmas[i], cond, guidance, module=module, cfg_grad=cfg_grad)
        if noise_level == 0:
            return samplers.ode_step(x, v, sigmas[i], sigmas[i + 1])
        return samplers.velocity_kernel_step(x, v, sigmas, i, noise_level, kernel, "SD3", self.kernels, noise=noise,
                                             next_x=next_x, noise_block=noise_block)

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        cfg = self.vae.config
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training
    # add_lora / full_finetune / named policies / save_trained / load_trained: _shared.DenoiserTraining
