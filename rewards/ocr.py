"""``ocr``: text rendering accuracy (flow_grpo's OCR reward).

Target text: ``metadata["text"]`` when given, else the first double-quoted span of the prompt (``"..."`` or
curly quotes), e.g. ``a sign that says "HELLO WORLD"`` -> ``HELLO WORLD``. Recognised text: everything the OCR
engine reads in the image, concatenated in reading order. Both are lower-cased with spaces removed, then
``reward = 1 - min(levenshtein(recognised, target), len(target)) / len(target)``, and 1 when the target is a
substring of the recognised text (flow_grpo's rule). Also returns ``distance`` (the clamped edit distance).

Backends:
- ``"rapidocr"`` (default): RapidOCR (PP-OCR detection + recognition) on onnxruntime; its ONNX weights ship
  inside the pip package, so it works offline. ``pip install 'flowalign[ocr]'``. ``threads`` caps onnxruntime's
  threads (default 1).
- ``"trocr"``: a transformers ``VisionEncoderDecoderModel`` (e.g. ``microsoft/trocr-base-printed``, or a local
  directory) reading the whole image as one line; ``path`` names it.
Not differentiable.
"""
from __future__ import annotations

import re

import torch
from PIL import Image

from ._common import first_line, from_pretrained
from .base import Reward, RewardError, register, to_uint8

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()


def target_text(prompt: str, meta: dict | None = None) -> str:
    """The text the image should show: ``meta["text"]`` or the prompt's first quoted span."""
    if meta and isinstance(meta.get("text"), str):
        return meta["text"]
    m = _QUOTED.search(prompt)
    if m is None:
        raise RewardError(f"ocr reward: no double-quoted target text in prompt {prompt[:80]!r} "
                          "(or give metadata 'text')")
    return m.group(1) if m.group(1) is not None else m.group(2)


def ocr_reward(recognised: str, target: str) -> tuple[float, int]:
    """(reward, clamped edit distance) with flow_grpo's rule."""
    rec, tgt = normalize_text(recognised), normalize_text(target)
    if not tgt:
        raise RewardError(f"ocr reward: empty target text {target!r}")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt), dist


class OCRReward(Reward):
    name = "ocr"
    differentiable = False

    def __init__(self, backend: str = "rapidocr", path: str | None = None, min_confidence: float = 0.0,
                 threads: int = 1, max_new_tokens: int = 32, device="cpu", dtype=torch.float32,
                 batch_size: int = 16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.backend, self.min_confidence, self.max_new_tokens = backend, float(min_confidence), max_new_tokens
        if backend == "rapidocr":
            try:
                from rapidocr import RapidOCR
            except ImportError:
                raise RewardError("ocr backend 'rapidocr' needs rapidocr and onnxruntime "
                                  "(pip install 'flowalign[ocr]')") from None
            params = {"Global.log_level": "error", "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
                      "EngineConfig.onnxruntime.inter_op_num_threads": 1}
            if path is not None:
                params["Global.model_root_dir"] = path
            try:
                self.engine = RapidOCR(params=params)
            except Exception as e:  # noqa: BLE001 - missing model files, bad params
                raise RewardError(f"ocr: could not start RapidOCR: {first_line(e)}") from None
        elif backend == "trocr":
            from transformers import AutoProcessor, VisionEncoderDecoderModel
            src = path or "microsoft/trocr-base-printed"
            self.model = from_pretrained(VisionEncoderDecoderModel, src, "ocr TrOCR model")
            self.model = self.model.to(self.device, self.dtype).eval().requires_grad_(False)
            self.processor = from_pretrained(AutoProcessor, src, "ocr TrOCR processor")
        else:
            raise RewardError(f"ocr backend must be 'rapidocr' or 'trocr', got {backend!r}")

    def recognise(self, images: torch.Tensor) -> list[str]:
        """The text read in each image."""
        pils = [Image.fromarray(a) for a in to_uint8(images)]
        if self.backend == "rapidocr":
            out = []
            for im in pils:
                res = self.engine(im, use_cls=False)
                txts, scores = res.txts or (), res.scores or ()
                out.append("".join(t for t, s in zip(txts, scores) if s >= self.min_confidence))
            return out
        px = self.processor(images=pils, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        with torch.no_grad():
            ids = self.model.generate(px, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def score(self, images, prompts, metadata):
        targets = [target_text(p, metadata[i] if metadata else None) for i, p in enumerate(prompts)]
        verdicts = [ocr_reward(r, t) for r, t in zip(self.recognise(images), targets)]
        return {"reward": torch.tensor([r for r, _ in verdicts]),
                "distance": torch.tensor([float(d) for _, d in verdicts])}


@register("ocr")
def _build(backend: str = "rapidocr", path: str | None = None, min_confidence: float = 0.0, threads: int = 1,
           max_new_tokens: int = 32, device: str = "cpu", dtype="float32", batch_size: int = 16) -> OCRReward:
    return OCRReward(backend=backend, path=path, min_confidence=min_confidence, threads=threads,
                     max_new_tokens=max_new_tokens, device=device, dtype=dtype, batch_size=batch_size)
