"""Shared pieces of the model-based rewards: finding weights, loading state dicts, torch preprocessing, heads.

Weights are named the way a GPU user names them, and the same loader serves a local copy:
- ``resolve_pretrained``/``from_pretrained``: a local directory (``save_pretrained`` layout) or a hub id;
- ``resolve_file``: one weight file, given as a local path, a local directory holding the expected file name,
  or ``"owner/repo:filename"`` (``"owner/repo"`` alone uses the default file name) fetched from the hub.
A missing local path raises a one-line ``RewardError`` naming it; a hub id that cannot be fetched (offline,
not cached) raises one naming the id.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _is_hub_id(s: str) -> bool:
    return bool(HUB_ID.match(s)) and not s.startswith((".", "~")) and not s.endswith(WEIGHT_SUFFIXES)


def resolve_pretrained(source, what: str) -> str:
    """A local model directory, or a hub id to hand to ``from_pretrained``."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise RewardError(f"{what}: expected a model directory or hub id, got {source!r}")
    s = os.path.expanduser(str(source))
    if os.path.isdir(s):
        return s
    if os.path.exists(s):
        raise RewardError(f"{what}: expected a model directory, got a file: {s}")
    if _is_hub_id(str(source)):
        return str(source)
    raise RewardError(f"{what}: weight directory not found: {s}")


def from_pretrained(cls, source, what: str, **kw):
    """``cls.from_pretrained(source)`` with one-line errors naming the directory or hub id."""
    path = resolve_pretrained(source, what)
    try:
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        where = "local directory" if os.path.isdir(path) else "not a local directory; hub id"
        raise RewardError(f"{what}: could not load {cls.__name__} from {str(source)!r} ({where}): "
                          f"{first_line(e)}") from None


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports (expected unused keys) while loading part of a checkpoint."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve_file(source, what: str, default_filename: str | None = None) -> str:
    """A weight file path from a local file, a local directory (+ default file name) or ``owner/repo[:file]``."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise RewardError(f"{what}: expected a weight file path or 'owner/repo:filename', got {source!r}")
    s = os.path.expanduser(str(source))
    if os.path.isfile(s):
        return s
    if os.path.isdir(s):
        if default_filename and os.path.isfile(os.path.join(s, default_filename)):
            return os.path.join(s, default_filename)
        raise RewardError(f"{what}: weight file {default_filename or '(none named)'} not found in directory {s}")
    repo, _, fname = str(source).partition(":")
    fname = fname or default_filename
    if not (_is_hub_id(repo) and fname):
        raise RewardError(f"{what}: weight file not found: {s}")
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo, fname)
    except Exception as e:  # noqa: BLE001 - offline, missing repo/file, auth: all one message
        raise RewardError(f"{what}: {str(source)!r} is not a local file and {repo}:{fname} could not be "
                          f"fetched from the hub: {first_line(e)}") from None


def load_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.safetensors or a torch pickle; weights_only), unwrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP ``module.`` prefix."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardError(f"{what}: could not read checkpoint {path}: {first_line(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise RewardError(f"{what}: checkpoint {path} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def require_keys(sd: dict, keys: Sequence[str], what: str, path) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise RewardError(f"{what}: checkpoint {path} lacks {len(missing)} expected key(s), e.g. {missing[0]!r} "
                          "(wrong file?)")


# ------------------------------------------------------------------------------------------ preprocessing
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", "nearest": "nearest", "bilinear": "bilinear",
             "bicubic": "bicubic"}


def _size_get(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ImagePreprocess:
    """Differentiable CLIP-style preprocessing of (B,3,H,W) images in [0, 1].

    resize (shortest edge to ``size`` like torchvision ``Resize(int)`` / transformers ``shortest_edge``, or to
    an exact ``(h, w)``) with antialiased bicubic interpolation (the PIL filter; width then height, clamped to
    [0, 1] after each pass as PIL clips to uint8), center crop, normalise with the checkpoint's mean/std.
    Matches the PIL processor up to its uint8 rounding; gradients flow to the input (zero where clamped).
    """

    def __init__(self, size: int | tuple[int, int] | None, crop: tuple[int, int] | None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 interpolation: str = "bicubic"):
        self.size, self.crop, self.interpolation = size, crop, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_image_processor(cls, ip) -> ImagePreprocess:
        """Read size / crop / mean / std / resample from a transformers image processor."""
        size = None
        if getattr(ip, "do_resize", True):
            se = _size_get(ip.size, "shortest_edge")
            size = int(se) if se else (int(_size_get(ip.size, "height")), int(_size_get(ip.size, "width")))
        crop = None
        if getattr(ip, "do_center_crop", False) and ip.crop_size is not None:
            crop = (int(_size_get(ip.crop_size, "height")), int(_size_get(ip.crop_size, "width")))
        mean, std = (ip.image_mean, ip.image_std) if getattr(ip, "do_normalize", True) else ((0, 0, 0), (1, 1, 1))
        resample = getattr(ip, "resample", 3)
        resample = int(resample) if not isinstance(resample, str) else resample
        return cls(size, crop, mean, std, _RESAMPLE.get(resample, "bicubic"))

    @property
    def out_size(self) -> int | None:
        if self.crop:
            return self.crop[0]
        return self.size if isinstance(self.size, int) else (self.size[0] if self.size else None)

    def resize_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.size is None:
            return h, w
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        return tuple(self.size)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False).clamp(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        nh, nw = self.resize_shape(h, w)
        x = x.float()
        # PIL resamples separably, horizontal pass first, clipping to uint8 range after each pass; doing the
        # same keeps us within the final uint8 rounding (0.5/255) of the PIL processor even on noise images.
        if nw != w:
            x = self._resize(x, (h, nw))
        if nh != h:
            x = self._resize(x, (nh, nw))
        if self.crop is not None:
            ch, cw = self.crop
            if nh < ch or nw < cw:  # like transformers: pad with zeros, image centred
                ph, pw = max(ch - nh, 0), max(cw - nw, 0)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
                nh, nw = x.shape[-2:]
            top, left = (nh - ch) // 2, (nw - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_clip_image_processor(source, what: str):
    """The CLIP image processor of a model directory / hub id (PIL backend when torchvision is absent)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as cls
    return from_pretrained(cls, source, what)


def load_tokenizer(source, what: str):
    from transformers import AutoTokenizer
    return from_pretrained(AutoTokenizer, source, what)


def unique_index(items: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(unique items in first-seen order, index of each item into them): embed repeated prompts once."""
    pos: dict[str, int] = {}
    idx = [pos.setdefault(s, len(pos)) for s in items]
    return list(pos), torch.tensor(idx, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ heads
def linear_stack_head(in_dim: int) -> nn.Sequential:
    """The LAION aesthetic / ImageReward head: Linear(in,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop
    Linear(64,16) Linear(16,1), no activations (state dict keys layers.0/2/4/6/7). Dropouts are inert in eval."""
    return nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_linear_stack_head(sd: dict, prefix: str, what: str, path, in_dim: int) -> nn.Sequential:
    """Build the head from ``sd`` keys ``{prefix}0.weight`` ...; checks its input size against ``in_dim``."""
    keys = [f"{prefix}{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    require_keys(sd, keys, what, path)
    got = sd[f"{prefix}0.weight"].shape[1]
    if got != in_dim:
        raise RewardError(f"{what}: the head in {path} takes {got}-d features but the backbone gives {in_dim}-d "
                          "(head and backbone do not belong together)")
    head = linear_stack_head(in_dim)
    try:
        head.load_state_dict({k[len(prefix):]: sd[k] for k in keys})
    except RuntimeError as e:
        raise RewardError(f"{what}: head weights in {path} have unexpected shapes: {first_line(e)}") from None
    return head


def empty_init():
    """Context in which modules get parameters on the meta device (no random init of weights that a state dict
    overwrites at once; load with ``assign=True``); a no-op without accelerate."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)


def load_into(module: nn.Module, sd: dict, what: str, source) -> nn.Module:
    """Load a mapped state dict (strict up to non-persistent ``position_ids``) with one-line errors."""
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RewardError(f"{what}: checkpoint {source} does not fit {type(module).__name__}; "
                          f"unmatched key(s) e.g. {(missing + unexpected)[0]!r}")
    if any(p.is_meta for p in module.parameters()):
        raise RewardError(f"{what}: checkpoint {source} left parameters of {type(module).__name__} unset")
    return module


def freeze(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
