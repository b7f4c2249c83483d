"""``artifact``: a learned artifact detector for ShapeWorld images, as a differentiable reward (log p(clean | x)).

The network (``ArtifactNet``) is a small trained MLP head on *frozen, fixed random* convolutional features
(three 3x3 conv layers drawn from a seeded generator and never trained; per channel the spatial mean, standard
deviation and max of every layer's activations, standardised). It shares nothing with the exact judge (no
palette, no detector) nor with ``shapeclip``. The head is trained on clean renders vs programmatic corruptions
(``flowalign.shapeworld.artifacts``: noise, colour blotches, smears, fragmented shapes, oversaturation) by
``python -m flowalign.shapeworld.artifact_train --out DIR``.

- weights: ``config.json`` + ``model.safetensors`` (random features included, so loading is exact); default the
  shipped ``rewards/assets/artifact``, ``path=`` loads another directory;
- ``reward`` = ``log p(clean | x)`` (<= 0; about 0 on clean images), ``p_artifact`` is reported too;
- differentiable: torch preprocessing (antialiased resize to 32 px when needed), gradients flow to the images.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardError, register

DEFAULT_PATH = Path(__file__).parent / "assets" / "artifact"
TRAIN_HINT = "python -m flowalign.shapeworld.artifact_train --out"
WEIGHTS = "model.safetensors"


class ArtifactNet(nn.Module):
    """logit p(artifact | x) for images (B, 3, H, W) in [0, 1]."""

    def __init__(self, widths=(16, 32, 64), hidden: int = 64, feature_seed: int = 0, image_size: int = 32):
        super().__init__()
        self.config = {"widths": list(widths), "hidden": int(hidden), "feature_seed": int(feature_seed),
                       "image_size": int(image_size)}
        self.image_size = int(image_size)
        g = torch.Generator().manual_seed(int(feature_seed))
        convs, cin = [], 3
        for i, w in enumerate(widths):
            conv = nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (9 * cin)) ** 0.5)
                conv.bias.copy_(0.1 * torch.randn(w, generator=g))
            conv.requires_grad_(False)
            convs.append(conv)
            cin = w
        self.features = nn.ModuleList(convs)
        dim = 3 * sum(widths)
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @property
    def feature_dim(self) -> int:
        return self.feat_mean.numel()

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        h = x * 2 - 1
        stats = []
        for conv in self.features:
            h = F.relu(conv(h))
            flat = h.flatten(2)
            stats += [flat.mean(-1), (flat.var(-1, unbiased=False) + 1e-6).sqrt(), flat.amax(-1)]
        return torch.cat(stats, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = (self.raw_features(images) - self.feat_mean) / self.feat_std
        return self.head(f).squeeze(-1)

    # ---------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(dict(self.config, architecture="ArtifactNet"), indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / WEIGHTS))
        return d

    @classmethod
    def from_pretrained(cls, directory) -> "ArtifactNet":
        from safetensors.torch import load_file

        d = Path(directory).expanduser()
        if not d.is_dir():
            raise RewardError(f"artifact: weight directory not found: {d} (train one with `{TRAIN_HINT} {d}`)")
        for f in ("config.json", WEIGHTS):
            if not (d / f).is_file():
                raise RewardError(f"artifact: no {f} in {d} (train one with `{TRAIN_HINT} {d}`)")
        try:
            cfg = json.loads((d / "config.json").read_text())
            cfg.pop("architecture", None)
            net = cls(**cfg)
            net.load_state_dict(load_file(str(d / WEIGHTS)))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardError(f"artifact: could not load ArtifactNet from {d}: {first[:300]}") from None
        return net.eval()


class ArtifactReward(Reward):
    name = "artifact"
    differentiable = True
    size = 32

    def __init__(self, path=None, device="cpu", dtype="float32", batch_size: int = 512):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.path = Path(path).expanduser() if path is not None else DEFAULT_PATH
        self.net = ArtifactNet.from_pretrained(self.path).to(self.device, self.dtype).requires_grad_(False)
        self.size = self.net.image_size

    def score(self, images, prompts, metadata):
        logit = self.net(images.to(self.device, self.dtype)).float()
        return {"reward": F.logsigmoid(-logit), "p_artifact": torch.sigmoid(logit)}


@register("artifact")
def _build(path=None, device: str = "cpu", dtype: str = "float32", batch_size: int = 512) -> ArtifactReward:
    return ArtifactReward(path=path, device=device, dtype=dtype, batch_size=batch_size)
