"""The reward interface and its registry.

A reward is called as ``reward(images, prompts, metadata=None) -> dict[str, Tensor]``:
- ``images``: a float tensor (B, 3, H, W) in [0, 1] (what the adapters decode to), or a list of PIL images /
  HxWx3 uint8 arrays;
- ``prompts``: list of B strings; ``metadata``: optional list of B dicts (e.g. GenEval metadata);
- returns named per-image scores of shape (B,); the key ``"reward"`` is the one training optimises, other keys
  are logged.
A reward declares ``differentiable`` (gradients flow from the scores back to ``images``; ReNO needs that),
its preferred input ``size`` and its device/dtype. Non-differentiable rewards run under ``torch.no_grad``;
differentiable ones too unless gradients are asked for (``grad=True``, or grad mode on and ``images``
requiring grad).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class RewardError(ValueError):
    """Bad input to a reward: wrong image range/shape, empty or mismatched batch, missing weights."""


def to_tensor(images) -> torch.Tensor:
    """Images (tensor in [0,1], list of PIL, list/array of uint8 HxWx3) -> float tensor (B,3,H,W) in [0,1]."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise RewardError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not torch.is_floating_point(x):
            raise RewardError(f"image tensors must be float in [0, 1], got dtype {x.dtype}")
        # NaN images (a diverged sampler) pass through on purpose: they give non-finite rewards, which the
        # trainer detects and skips
        if x.numel() and (x.detach().min() < -1e-3 or x.detach().max() > 1 + 1e-3):
            raise RewardError(f"image values must lie in [0, 1], got [{x.min().item():.3f}, {x.max().item():.3f}]"
                              " (decode with adapter.decode, which returns [0, 1])")
        return x
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise RewardError(f"images must be a tensor or a list of images, got {type(images).__name__}")
    if not images:
        raise RewardError("empty image batch")
    arrs = []
    for im in images:
        a = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise RewardError(f"each image must be HxWx3, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise RewardError(f"array images must be uint8 HxWx3, got dtype {a.dtype}")
        arrs.append(a)
    if len({a.shape for a in arrs}) > 1:
        raise RewardError("images in one batch must have the same size")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype or its config spelling ("float32", "fp16", "bf16", "torch.bfloat16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise RewardError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8."""
    return (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def check_batch(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> None:
    if isinstance(prompts, str):
        raise RewardError("prompts must be a list of strings, one per image, not a single string")
    if len(prompts) == 0:
        raise RewardError("empty prompt list")
    if len(prompts) != images.shape[0]:
        raise RewardError(f"batch mismatch: {images.shape[0]} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise RewardError(f"batch mismatch: {images.shape[0]} images but {len(metadata)} metadata records")


def _chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def _rows(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.reshape(-1) if v.numel() == n else v.reshape(n, -1)


class Reward:
    """Base class. Subclasses implement ``score(images (B,3,H,W) in [0,1], prompts, metadata) -> dict``."""

    name: str = "reward"
    differentiable: bool = False
    group_scope: bool = False   # needs whole prompt groups: finished by ``finalize`` after the trainer's gather
    needs_images: bool = False  # ``finalize`` needs the gathered images, prompts and metadata (a pairwise judge)
    size: int | None = None  # preferred square input size; None = any
    needs_metadata: bool = False

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 64):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
                 grad: bool | None = None) -> dict[str, torch.Tensor]:
        x = to_tensor(images)
        check_batch(x, prompts, metadata)
        if self.needs_metadata and metadata is None:
            raise RewardError(f"reward {self.name!r} needs metadata (e.g. GenEval records), got none")
        # Build a graph only when it can be used: a differentiable reward, and either an explicit grad=True or
        # grad mode on with an input that requires grad (the reward models' own parameters are frozen).
        if grad is None:
            grad = torch.is_grad_enabled() and x.requires_grad
        grad = self.differentiable and grad
        prompts, metadata = list(prompts), (list(metadata) if metadata is not None else None)
        outs: list[dict[str, torch.Tensor]] = []
        with torch.set_grad_enabled(grad):
            for i in range(0, x.shape[0], self.batch_size):
                sl = slice(i, i + self.batch_size)
                outs.append(self.score(x[sl], prompts[sl], metadata[sl] if metadata is not None else None))
        # per-sample scalars come back as (B,); per-sample vectors (an embedding, for a group-scope finalize) as (B, D)
        return {k: torch.cat([_rows(o[k], len(p)).float().to(x.device) for o, p in zip(outs, _chunks(prompts, self.batch_size))])
                for k in outs[0]}

    def finalize(self, outputs: dict[str, torch.Tensor], groups: torch.Tensor, **batch) -> dict[str, torch.Tensor]:
        """For a group-scope reward: turn the outputs of every sample of an iteration (gathered from all
        processes) into the final ones, ``groups`` holding each sample's group id. Pointwise rewards: unchanged."""
        return outputs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


# ---------------------------------------------------------------------------------------------- registry
REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


def known_rewards() -> list[str]:
    from . import _load_all  # noqa: F401  (fills the registry)
    return sorted(REGISTRY)


def register_import_path(name: str) -> None:
    """A reward of the user's own, named by import path ``package.module:Factory`` (a ``Reward`` subclass or any
    callable taking the reward's options and returning one): imported and registered under that name."""
    if name in REGISTRY or ":" not in name:
        return
    import importlib

    mod, attr = name.split(":", 1)
    try:
        REGISTRY[name] = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {name!r}: cannot import {attr!r} from module {mod!r} ({e})") from None


def build_reward(name: str, **options) -> Reward:
    """Construct a registered reward by name (or by import path ``module:Factory``) with keyword options; unknown
    names list the known ones."""
    known = known_rewards()
    register_import_path(name)
    if name not in REGISTRY:
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(known)}")
    fn = REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        bad = [k for k in options if k not in params]
        if bad:
            raise RewardError(f"reward {name!r} has no option(s) {', '.join(map(repr, bad))}; "
                              f"options: {', '.join(params)}")
    return fn(**options)
