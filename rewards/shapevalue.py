"""``shapevalue``: a learned, differentiable ShapeWorld reward and value model, distilled from the *training* judge
(version 2, ``detector_v2``: strict verdict, lenient verdict, per-clause partial credit) on the shipped model's own
rollouts over training prompts.

Separate from ``shapeclip`` (which stays the hackable proxy). Given a prompt's GenEval metadata and an image that is
a final sample *or* the predicted clean image x̂0 of an intermediate sampling step, it predicts the probability that
the rollout's final image passes the training judge v2's strict verdict; so it can serve as FK steering's
potential on blurry x̂0, as best-of-N's verifier and as ReNO's reward. The held-out judge was never a target.

- weights: ``rewards/assets/shapevalue`` (``model.pt`` + ``config.json``, about 1 MB); ``path=`` loads another;
  recipe: ``python -m flowalign.shapeworld.shapevalue_train`` (``data``, ``train``, ``evaluate``);
- needs GenEval metadata (``metadata=``); a ShapeWorld prompt without it is looked up in the prompt files;
- preprocessing in torch: bilinear (antialiased) resize to 32 px when needed; then the model's own normalisation;
- ``reward`` = P(strict verdict) (``output="logit"``: its logit); also ``p_lenient`` and ``partial`` (the predicted
  partial credit); differentiable: gradients flow to the images.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward, RewardError, register

DEFAULT_PATH = Path(__file__).parent / "assets" / "shapevalue"
TRAIN_HINT = "python -m flowalign.shapeworld.shapevalue_train"
OUTPUTS = ("probability", "logit")

_PROMPT_META: dict[str, dict] | None = None


def _meta_for_prompt(prompt: str) -> dict:
    global _PROMPT_META
    if _PROMPT_META is None:
        from flowalign.shapeworld.prompts import all_metadata

        _PROMPT_META = {m["prompt"]: m for ms in all_metadata().values() for m in ms}
    if prompt not in _PROMPT_META:
        raise RewardError(f"shapevalue: no GenEval metadata for prompt {prompt!r} (not a ShapeWorld prompt; pass "
                          "metadata=)")
    return _PROMPT_META[prompt]


class ShapeValueReward(Reward):
    name = "shapevalue"
    differentiable = True
    size = 32

    def __init__(self, path=None, output: str = "probability", device="cpu", dtype="float32", batch_size: int = 256):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from flowalign.shapeworld import shapevalue_train as svt

        if output not in OUTPUTS:
            raise RewardError(f"shapevalue: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        d = Path(path).expanduser() if path is not None else DEFAULT_PATH
        if not (d / "model.pt").is_file() or not (d / "config.json").is_file():
            raise RewardError(f"shapevalue: no model.pt + config.json in {d} (train one with `{TRAIN_HINT} "
                              f"train --data DIR --out {d}`)")
        try:
            self.model = svt.load(d).to(self.device, self.dtype).requires_grad_(False)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardError(f"shapevalue: could not load {d}: {first[:300]}") from None
        self.encode = svt.encode_meta
        self.output, self.path = output, d
        self.size = self.model.cfg.size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def meta_vectors(self, prompts, metadata) -> torch.Tensor:
        metas = metadata if metadata is not None else [_meta_for_prompt(p) for p in prompts]
        try:
            v = [self.encode(m) for m in metas]
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise RewardError(f"shapevalue: not ShapeWorld GenEval metadata ({type(e).__name__}: {e})") from None
        return torch.tensor(v, dtype=self.dtype, device=self.device)

    def score(self, images, prompts, metadata):
        logits = self.model(self.preprocess(images), self.meta_vectors(prompts, metadata)).float()
        p = torch.sigmoid(logits)
        return {"reward": p[:, 0] if self.output == "probability" else logits[:, 0], "logit": logits[:, 0],
                "p_strict": p[:, 0], "p_lenient": p[:, 1], "partial": p[:, 2]}


@register("shapevalue")
def _build(path=None, output: str = "probability", device: str = "cpu", dtype: str = "float32",
           batch_size: int = 256) -> ShapeValueReward:
    return ShapeValueReward(path=path, output=output, device=device, dtype=dtype, batch_size=batch_size)
