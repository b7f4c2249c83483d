"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): rectified flow, velocity prediction,
FlowMatchEuler sigmas with the checkpoint's shift, CFG by batch concatenation, optional T5.

The embedded ShapeWorld model is this architecture (two tiny CLIP encoders, no T5).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from flowalign import samplers

from .base import Cond, ModelLoadError, check_model_path

# attention projections LoRA targets in SD3's joint transformer blocks (flow_grpo's choice)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Adapter:
    family = "sd3"
    prediction_type = "flow"
    supports_cfg = True
    kernels = ("sde", "cps")  # the stochastic steps ``step`` implements (the trainer refuses others)

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
        # named policies besides the trained one: a frozen module copy (full fine-tuning), the LoRA tensors of that
        # policy (LoRA; swapped in for its forwards), or None for the reference of a LoRA run (adapters disabled)
        self._policies: dict[str, torch.nn.Module | list[torch.Tensor] | None] = {}
        self._active: str | None = None  # the named policy ``predict`` uses inside ``policy(name)``
        self.lora_config = None

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
        pol = self._policies.get(self._active) if self._active else None
        if isinstance(pol, torch.nn.Module):
            model = pol
        elif self._active is not None:  # LoRA tensors swapped in, or adapters disabled: the plain module
            model = self.transformer
        else:
            model = module if module is not None else self.transformer
        B = x.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B) * 1000
        use_cfg = guidance > 1.0 and cond.neg_embeds is not None
        if use_cfg and cfg_grad == "cond" and torch.is_grad_enabled():
            with torch.no_grad():
                plain = self.transformer if self._active is None else model
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
    def add_lora(self, rank: int = 32, alpha: float = 64, targets=LORA_TARGETS, init: str | bool = "gaussian"):
        from peft import LoraConfig

        present = {n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0"
                   for n, _ in self.transformer.named_modules()}
        targets = [t for t in targets if t in present]
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(self.lora_config)
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def full_finetune(self):
        self.transformer.requires_grad_(True)
        return list(self.transformer.parameters())

    def trainable_parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ named policies
    def add_policy(self, name: str) -> None:
        """Keep a policy besides the trained one, initialised to the current weights: ``"reference"`` (the frozen
        start: for a LoRA run the adapters disabled, nothing stored) or any other name (e.g. ``"old"``: moved with
        ``snapshot_policy`` / ``lerp_policy``). Full fine-tuning keeps a frozen module copy; a LoRA run keeps a copy
        of the LoRA tensors only, swapped in for that policy's forwards (a second adapter's worth of memory)."""
        if name in self._policies:
            return
        if name == "reference" and self.lora_config is not None:
            self._policies[name] = None
        elif self.lora_config is not None:
            self._policies[name] = [p.detach().clone() for p in self.trainable_parameters()]
        else:
            self._policies[name] = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    def policy_tensors(self, name: str) -> list[torch.Tensor]:
        """The weights of a named policy that has its own (not a LoRA run's reference), in the order of the
        trained parameters: for checkpoints (read, or ``copy_`` into them to restore)."""
        return self._policy_tensors(name)

    def _policy_tensors(self, name: str) -> list[torch.Tensor]:
        pol = self._policies.get(name, "missing")
        if pol is None or isinstance(pol, str):
            raise RuntimeError(f"policy {name!r} has no weights of its own (known: {sorted(self._policies)})")
        return [p for p in pol.parameters()] if isinstance(pol, torch.nn.Module) else pol

    @torch.no_grad()
    def snapshot_policy(self, name: str) -> None:
        """Set a named policy to the current trained weights."""
        self.lerp_policy(name, 1.0)

    @torch.no_grad()
    def lerp_policy(self, name: str, weight: float) -> None:
        """policy <- policy + weight x (current - policy) (EMA of the trained weights with decay 1 - weight)."""
        live = self.trainable_parameters() if self.lora_config is not None else list(self.transformer.parameters())
        torch._foreach_lerp_(self._policy_tensors(name), [p.detach() for p in live], float(weight))

    @contextlib.contextmanager
    def policy(self, name: str):
        """Inside, ``predict`` uses the named policy (see ``add_policy``); use it under no_grad."""
        if name not in self._policies:
            raise RuntimeError(f"no policy {name!r}: call adapter.add_policy({name!r}) before training "
                               f"(known: {sorted(self._policies)})")
        if self._active is not None:
            raise RuntimeError(f"policy({name!r}) inside policy({self._active!r})")
        pol = self._policies[name]
        swap = isinstance(pol, list)
        params = self.trainable_parameters() if swap else []
        if pol is None:
            self.transformer.disable_adapters()
        elif swap:  # LoRA: put that policy's tensors in place (pointer swap, no copy)
            for p, s in zip(params, pol):
                p.data, s.data = s.data, p.data
        self._active = name
        try:
            yield
        finally:
            self._active = None
            if pol is None:
                self.transformer.enable_adapters()
            elif swap:
                for p, s in zip(params, pol):
                    p.data, s.data = s.data, p.data

    def reference(self):
        """Inside, ``predict`` uses the reference model: LoRA disabled, or a frozen copy (full fine-tuning)."""
        if "reference" not in self._policies:
            if self.lora_config is None:
                raise RuntimeError("no reference model: call adapter.add_policy('reference') before training")
            self.add_policy("reference")  # a LoRA run's reference needs no storage: the adapters disabled
        return self.policy("reference")

    def freeze_reference(self):
        """Keep the current weights as the reference (``add_policy('reference')``)."""
        self.add_policy("reference")

    def enable_gradient_checkpointing(self):
        self.transformer.enable_gradient_checkpointing()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_trained(self, directory) -> None:
        """LoRA weights in the diffusers format (``pipe.load_lora_weights(directory)``), or the full transformer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora_config is not None:
            from diffusers import StableDiffusion3Pipeline

            # the adapter metadata (rank, alpha, targets) travels with the weights, so that load_lora_weights
            # applies the same alpha / rank scale
            StableDiffusion3Pipeline.save_lora_weights(
                str(directory), transformer_lora_layers=self.lora_state_dict(),
                transformer_lora_adapter_metadata=self.lora_config.to_dict())
        else:
            self.transformer.save_pretrained(str(directory / "transformer"))

    def load_trained(self, directory) -> None:
        """Apply what ``save_trained`` wrote (a run's ``final/``: LoRA weights, or a full ``transformer/``), or a full
        fine-tuning run's checkpoint directory (``checkpoints/iter_N``)."""
        from flowalign.pipelines.base import ModelLoadError

        directory = Path(directory)
        from flowalign import checkpoint

        if checkpoint.is_checkpoint(directory):
            # a trainer checkpoint (checkpoints/iter_N): the trainable weights of a full fine-tuning run
            weights = checkpoint.load_weights(directory)
            if any("lora_" in k for k in weights):
                raise ModelLoadError(f"{directory} is a LoRA training checkpoint: evaluate the run's final/ "
                                     f"directory, or resume the run to write one")
            res = self.transformer.load_state_dict(weights, strict=False)
            if res.unexpected_keys or any(k.endswith(("weight", "bias")) for k in res.missing_keys):
                raise ModelLoadError(f"{directory}: checkpoint weights do not fit this transformer "
                                     f"({len(res.unexpected_keys)} unexpected, {len(res.missing_keys)} missing)")
        elif (directory / "transformer").is_dir():
            from diffusers import SD3Transformer2DModel

            tr = SD3Transformer2DModel.from_pretrained(str(directory / "transformer"), torch_dtype=self.transformer.dtype)
            self.transformer = self.pipe.transformer = tr.to(self.device).eval().requires_grad_(False)
        elif directory.is_dir() and any(directory.glob("*.safetensors")):
            self.pipe.load_lora_weights(str(directory))
        else:
            raise ModelLoadError(f"no trained weights in {directory}: expected {directory}/transformer/ (full "
                                 f"fine-tuning) or LoRA .safetensors (a run's final/ directory)")
