"""Adapter for Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): a UNet predicting epsilon or v (the
scheduler config's ``prediction_type``), sampled with DDIM, one CLIP text encoder, CFG by batch concatenation.

The adapter speaks the flow engine's language through the flow view of a DDPM (``pipelines/_shared.py``):

- ``schedule(T)`` returns the flow sigmas s = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)) of the DDIM timesteps (with
  "trailing" spacing: the first step is always the top timestep, so x_T is the same for every step count), the last
  entry that of the scheduler's final alpha_bar;
- latents are flow latents x = x_vp / (sqrt(ab) + sqrt(1 - ab)); ``init_noise`` is the stock draw z (the VP latent
  at the top timestep) in these coordinates, ``decode`` converts back at the final alpha_bar;
- ``predict`` returns the flow velocity eps - x0 (from the UNet's epsilon or v, CFG inside), so the flow kernels,
  the forward-process losses and ReNO's Euler preview run unchanged; ``predict_native`` / ``to_eps`` / ``to_x0`` /
  ``to_velocity`` give the UNet's own output and the conversions;
- ``step`` with ``kernel="ddim"`` (or noise level 0) is DDIM with eta = noise_level
  (``samplers.ddim_flow_step``, the scheduler's exact alpha_bars): with eta 0 it reproduces the stock pipeline's
  DDIM image; ``kernel="sde"`` / ``"cps"`` run the flow kernels on the flow view.

GPU options (``from_pretrained(..., dtype=torch.float16, attention="xformers", vae_slicing=True, vae_tiling=True,
cache_text=True)``, ``enable_gradient_checkpointing()``) are written and guarded but untested here (CPU only).
"""
from __future__ import annotations


import torch


from ._shared import apply_gpu_options, cached_cond, DDPMFlowSteps, DenoiserTraining, UNET_LORA_TARGETS, vp_scale
from .base import Cond, ModelLoadError, check_model_path


class SD15Adapter(DDPMFlowSteps, DenoiserTraining):
    family = "sd15"
    trained_format = ("StableDiffusionPipeline", "unet", "UNet2DConditionModel")
    lora_targets = UNET_LORA_TARGETS
    supports_cfg = True
    kernels = ("ddim", "sde", "cps")
    default_kernel = "ddim"

    def __init__(self, pipe, resolution: int | None = None, cache_text: bool = False):
        self._setup_unet(pipe, resolution, cache_text, (pipe.text_encoder,))

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", attention: str | None = None,
                        vae_slicing: bool = False, vae_tiling: bool = False, **kw) -> "SD15Adapter":
        from diffusers import StableDiffusionPipeline

        path = check_model_path(path)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load a Stable Diffusion pipeline from {path}: "
                                 f"{str(e).splitlines()[0]}") from None
        ad = cls(pipe.to(device), **kw)
        apply_gpu_options(pipe, ad.unet, attention=attention, vae_slicing=vae_slicing, vae_tiling=vae_tiling)
        return ad

    # device / denoiser / default_size / latent_shape: _shared.DDPMFlowSteps

    # ------------------------------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], negative: str | None = "") -> Cond:
        prompts = list(prompts)
        return cached_cond(self._text_cache, prompts, negative, lambda: self._encode(prompts, negative))

    def _encode(self, prompts: list[str], negative: str | None) -> Cond:
        cfg = negative is not None
        pe, npe = self.pipe.encode_prompt(prompts, self.device, 1, cfg,
                                          negative_prompt=[negative] * len(prompts) if cfg else None)
        return Cond(pe, None, npe if cfg else None, None)

    # init_noise / init_noise_std / schedule / predict_native: _shared.DDPMFlowSteps (this adapter's ``_call``
    # runs the UNet on one CFG branch or both)

    def _call(self, model, x, t, cond: Cond, negative):
        """negative True: the unconditional rows; False: the conditional; None: both, unconditional first."""
        if negative is None:
            emb = torch.cat([cond.neg_embeds, cond.embeds])
        else:
            emb = cond.neg_embeds if negative else cond.embeds
        return model(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    # to_eps / to_x0 / to_velocity / predict / step in the flow view: _shared.DDPMFlowSteps

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Images in [0, 1] of final flow latents (converted back to VP at the scheduler's final alpha_bar)."""
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = latents.float() * vp_scale(torch.tensor(self.view.final_ab)).item()
            z = z.to(self.vae.dtype) / self.vae.config.scaling_factor
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training
    # add_lora / full_finetune / named policies / save_trained / load_trained: _shared.DenoiserTraining
