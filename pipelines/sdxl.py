"""Adapter for Stable Diffusion XL (``StableDiffusionXLPipeline``; SDXL-Turbo is the same layout): a UNet predicting
epsilon or v with SDXL's added conditioning (the pooled embedding of the second text encoder and the six "time ids"
original size, crop corner, target size), two CLIP encoders whose penultimate states are concatenated, CFG by batch
concatenation; sampled with DDIM.

Everything else is as the SD1.5 adapter (``pipelines/sd15.py``, one adapter per family, no inheritance): the DDPM
flow view (flow sigmas and velocities, ``kernel="ddim"`` = DDIM with eta = noise_level on flow latents, the
scheduler's exact alpha_bars, trailing spacing), LoRA on the UNet's attention projections in the diffusers format,
named policies. The stock SDXL scheduler (Euler) is replaced by DDIM with the checkpoint's betas.

An empty negative prompt is SDXL's default unconditional branch: zeros when the checkpoint sets
``force_zeros_for_empty_prompt`` (as the stock pipeline does without a negative prompt).

GPU options (``dtype=torch.float16`` -- the VAE is kept in float32 when its config says ``force_upcast``, as the stock
pipeline upcasts it --, ``attention="xformers"``, VAE slicing / tiling, ``cache_text``,
``enable_gradient_checkpointing()``) are written and guarded but untested here (CPU only).
"""
from __future__ import annotations


import torch


from ._shared import apply_gpu_options, cached_cond, DDPMFlowSteps, DenoiserTraining, UNET_LORA_TARGETS, vp_scale
from .base import Cond, ModelLoadError, check_model_path


class SDXLAdapter(DDPMFlowSteps, DenoiserTraining):
    family = "sdxl"
    trained_format = ("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel")
    lora_targets = UNET_LORA_TARGETS
    supports_cfg = True
    kernels = ("ddim", "sde", "cps")
    default_kernel = "ddim"

    def __init__(self, pipe, resolution: int | None = None, cache_text: bool = False):
        self._setup_unet(pipe, resolution, cache_text, (pipe.text_encoder, pipe.text_encoder_2), upcast_vae=True)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", attention: str | None = None,
                        vae_slicing: bool = False, vae_tiling: bool = False, **kw) -> "SDXLAdapter":
        from diffusers import StableDiffusionXLPipeline

        path = check_model_path(path)
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load a Stable Diffusion XL pipeline from {path}: "
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
        # "" is the pipeline's default unconditional branch (zeros with force_zeros_for_empty_prompt)
        neg = None if not cfg or negative == "" else [negative] * len(prompts)
        pe, npe, pp, npp = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=cfg, negative_prompt=neg)
        return Cond(pe, pp, npe if cfg else None, npp if cfg else None)

    # init_noise / init_noise_std / schedule / predict_native: _shared.DDPMFlowSteps (this adapter's ``_call``
    # runs the UNet on one CFG branch or both)

    def time_ids(self, x: torch.Tensor) -> torch.Tensor:
        """SDXL's added time ids (original size, crop top-left, target size) of an image of x's size, per row."""
        h, w = x.shape[-2] * self.pipe.vae_scale_factor, x.shape[-1] * self.pipe.vae_scale_factor
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)

    def _call(self, model, x, t, cond: Cond, negative):
        """negative True: the unconditional rows; False: the conditional; None: both, unconditional first."""
        if negative is None:
            emb, pooled = torch.cat([cond.neg_embeds, cond.embeds]), torch.cat([cond.neg_pooled, cond.pooled])
        elif negative:
            emb, pooled = cond.neg_embeds, cond.neg_pooled
        else:
            emb, pooled = cond.embeds, cond.pooled
        added = {"text_embeds": pooled.to(x.dtype), "time_ids": self.time_ids(x)}
        return model(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]

    # to_eps / to_x0 / to_velocity / predict / step in the flow view: _shared.DDPMFlowSteps

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Images in [0, 1] of final flow latents (converted back to VP at the scheduler's final alpha_bar)."""
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = latents.float() * vp_scale(torch.tensor(self.view.final_ab)).item()
            cfg = self.vae.config
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
                std = torch.tensor(std).view(1, -1, 1, 1).to(z)
                z = (z * std / cfg.scaling_factor + mean).to(self.vae.dtype)
            else:
                z = z.to(self.vae.dtype) / cfg.scaling_factor
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ training
    # add_lora / full_finetune / named policies / save_trained / load_trained: _shared.DenoiserTraining
