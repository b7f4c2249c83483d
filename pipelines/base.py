"""The model-adapter interface: everything the trainer, rollout engine and noise optimiser may ask of a model.

One adapter per diffusers family; nothing outside ``flowalign.pipelines`` touches a pipeline's internals.

    adapter.encode(prompts, negative="")      -> Cond (text conditioning, computed once per batch)
    adapter.init_noise(n, generator(s))       -> x_T, shape (n, *adapter.latent_shape())
    adapter.schedule(num_steps)               -> sigmas (T+1,), the family's shift applied, last 0
    adapter.predict(x, sigma, cond, guidance, module=None, cfg_grad="both")
                                              -> velocity (flow) or epsilon (DDPM), CFG inside; ``module`` is the
                                                 (wrapped) trained module to run, ``cfg_grad`` which CFG branches
                                                 carry gradients
    adapter.step(x, sigmas, i, cond, ...)     -> samplers.StepOutput; samples when next_x is None, scores otherwise
    adapter.decode(latents, differentiable)   -> images (B, 3, H, W) in [0, 1]
    adapter.denoiser                          -> the trainable module
    adapter.add_policy(name) / policy(name)   -> named policies besides the trained one ("reference": the frozen
                                                 start; "old", "ema", ...: moved by snapshot_policy / lerp_policy);
                                                 ``policy(name)`` is a context manager, ``reference()`` its alias
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch


class ModelLoadError(FileNotFoundError):
    pass


@dataclass
class Cond:
    """Text conditioning for a batch: positive and (for CFG) negative embeddings, row-aligned with the batch."""
    embeds: torch.Tensor
    pooled: torch.Tensor
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx) -> "Cond":
        return Cond(**{f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None else None)
                       for f in fields(self)})

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        return Cond(**{f.name: (torch.cat([getattr(c, f.name) for c in conds]) if getattr(conds[0], f.name) is not None
                                else None) for f in fields(Cond)})

    def to(self, device) -> "Cond":
        return Cond(**{f.name: (getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None)
                       for f in fields(self)})


def check_model_path(path) -> str:
    """A local directory must exist and hold a diffusers ``model_index.json``; anything else is a hub id."""
    s = str(path)
    p = Path(s).expanduser()
    looks_local = s.startswith((".", "/", "~")) or p.exists() or s.count("/") != 1
    if looks_local:
        if not p.is_dir():
            raise ModelLoadError(f"model directory not found: {s}")
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"not a diffusers pipeline directory (no model_index.json): {s}")
        return str(p)
    return s


FAMILIES = {"sd3": "flowalign.pipelines.sd3:SD3Adapter", "flux": "flowalign.pipelines.flux:FluxAdapter",
            "sd15": "flowalign.pipelines.sd15:SD15Adapter", "sdxl": "flowalign.pipelines.sdxl:SDXLAdapter"}
# model_index.json "_class_name" -> family (SD 2.x and SD-Turbo are StableDiffusionPipeline, SDXL-Turbo is SDXL's)
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "StableDiffusionPipeline": "sd15",
                    "StableDiffusionXLPipeline": "sdxl"}


def load_adapter(path, family: str | None = None, **kw):
    """Load the adapter for a pipeline dir or hub id; the family is read from model_index.json when not given."""
    import importlib
    import json

    path = check_model_path(path)
    if family is None:
        idx = Path(path) / "model_index.json"
        cls_name = json.loads(idx.read_text()).get("_class_name", "") if idx.is_file() else ""
        family = PIPELINE_CLASSES.get(cls_name)
        if family is None:
            raise ModelLoadError(f"cannot tell the model family of {path} (pipeline class {cls_name!r}); "
                                 f"known families: {', '.join(FAMILIES)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    mod, cls = FAMILIES[family].split(":")
    return getattr(importlib.import_module(mod), cls).from_pretrained(path, **kw)
