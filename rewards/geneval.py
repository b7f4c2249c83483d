"""``geneval``: a GenEval-style detector reward with an open-vocabulary detector (OWLv2) and the same rules as
our evaluator (``flowalign.eval.geneval.judge``).

Pipeline per image (``metadata`` is required: GenEval records with ``tag``/``include``/``exclude``):
1. detection: transformers ``Owlv2ForObjectDetection`` (default ``google/owlv2-base-patch16-ensemble``; a local
   directory works the same) queried with ``"a photo of a {class}"`` for the vocabulary — by default the union of
   the classes named in the batch's metadata (``vocabulary="coco"`` adds GenEval's 80 COCO classes, so boxes
   compete across classes as in GenEval's closed-set detector). Each box takes its best query as label and the
   sigmoid score as confidence.
2. GenEval's thresholds: keep boxes scoring above 0.3, above 0.9 for ``counting`` prompts; at most 16 per class.
   GenEval does no NMS (its Mask2Former gives one instance per object); OWLv2 proposes overlapping boxes per
   object, so we suppress same-class boxes with IoU > ``nms_iou`` = 0.5 (``nms_iou=1.0`` turns this off).
3. colour of each box of a class that a colour clause asks about: GenEval classifies the crop with CLIP over
   ``"a photo of a {color} {class}"``; we do the same when ``clip`` names a CLIP model (directory or hub id).
   Without one we use a documented simpler rule: the crop's foreground (pixels far from the median colour of
   the crop's border) mean colour, nearest named colour in CIELAB among GenEval's ten colours and the metadata's.
4. ``judge(meta, detections)`` with detections ``{cls, color, centroid (box centre, x,y in [0,1]), score,
   bbox (x0,y0,x1,y1 in [0,1])}`` gives (correct, partial credit).
Returns ``reward`` (partial credit, or 0/1 with ``mode="binary"``), ``correct``, ``partial``, ``n_detections``.
Not differentiable.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ._common import from_pretrained
from .base import Reward, RewardError, register, to_uint8

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_RGB = {"red": (220, 30, 30), "orange": (245, 140, 0), "yellow": (240, 220, 0), "green": (30, 170, 50),
             "blue": (30, 70, 230), "purple": (150, 40, 190), "pink": (250, 150, 190), "brown": (135, 80, 35),
             "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128), "grey": (128, 128, 128)}
# GenEval's object vocabulary (the 80 COCO classes, GenEval's spelling)
COCO_CLASSES = tuple(c.strip() for c in (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign, "
    "parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella, "
    "handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, "
    "surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, "
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, "
    "laptop, computer mouse, tv remote, computer keyboard, cell phone, microwave, oven, toaster, sink, "
    "refrigerator, book, clock, vase, scissors, teddy bear, hair drier, toothbrush").split(","))
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 16
QUERY = "a photo of a {}"


# ------------------------------------------------------------------------------------------------ helpers
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes (N,4) x (M,4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS; indices kept, best first. ``iou >= 1`` keeps everything (sorted)."""
    order = list(np.argsort(-scores, kind="stable"))
    if iou >= 1:
        return order
    keep: list[int] = []
    for i in order:
        if not keep or box_iou(boxes[[i]], boxes[keep]).max() <= iou:
            keep.append(i)
    return keep


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def mean_color_name(img: np.ndarray, bbox, candidates) -> str | None:
    """The named colour nearest (CIELAB) to the mean foreground colour inside ``bbox`` (x0,y0,x1,y1 in [0,1])
    of an HxWx3 uint8 image; foreground = pixels more than 40 (RGB distance) from the median border colour."""
    names = [c for c in candidates if c in COLOR_RGB]
    if not names:
        return None
    H, W = img.shape[:2]
    x0, y0 = int(np.floor(bbox[0] * W)), int(np.floor(bbox[1] * H))
    x1, y1 = max(int(np.ceil(bbox[2] * W)), x0 + 1), max(int(np.ceil(bbox[3] * H)), y0 + 1)
    crop = img[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)].reshape(-1, 3).astype(np.float64)
    if crop.size == 0:
        return None
    h, w = min(y1, H) - max(y0, 0), min(x1, W) - max(x0, 0)
    grid = crop.reshape(h, w, 3)
    border = np.concatenate([grid[0], grid[-1], grid[:, 0], grid[:, -1]])
    fg = crop[np.linalg.norm(crop - np.median(border, 0), axis=1) > 40]
    if len(fg) < max(1, 0.05 * len(crop)):
        fg = grid[h // 4: h - h // 4 or None, w // 4: w - w // 4 or None].reshape(-1, 3)
    lab = _srgb_to_lab(fg.mean(0))
    ref = _srgb_to_lab(np.array([COLOR_RGB[n] for n in names], np.float64))
    return names[int(np.argmin(np.linalg.norm(ref - lab, axis=1)))]


def clause_classes(meta: dict) -> list[str]:
    return [c["class"] for c in list(meta["include"]) + list(meta.get("exclude", []))]


def color_classes(meta: dict) -> set[str]:
    return {c["class"] for c in list(meta["include"]) + list(meta.get("exclude", [])) if "color" in c}


class GenEvalReward(Reward):
    name = "geneval"
    needs_metadata = True
    differentiable = False

    def __init__(self, path: str = "google/owlv2-base-patch16-ensemble", clip: str | None = None,
                 vocabulary: str | list[str] = "batch", threshold: float = THRESHOLD,
                 counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                 nms_iou: float = 0.5, mode: str = "partial", device="cpu", dtype=torch.float32,
                 batch_size: int = 16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import Owlv2ForObjectDetection, Owlv2Processor
        if mode not in ("partial", "binary"):
            raise RewardError(f"geneval mode must be 'partial' or 'binary', got {mode!r}")
        if not (isinstance(vocabulary, (list, tuple)) or vocabulary in ("batch", "coco")):
            raise RewardError(f"geneval vocabulary must be 'batch', 'coco' or a list of class names, got {vocabulary!r}")
        for nm, v in (("threshold", threshold), ("counting_threshold", counting_threshold), ("nms_iou", nms_iou)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise RewardError(f"geneval {nm} must be a number in [0, 1], got {v!r}")
        self.mode, self.vocabulary = mode, vocabulary
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.nms_iou = int(max_objects), float(nms_iou)
        self.model = from_pretrained(Owlv2ForObjectDetection, path, "geneval detector (OWLv2)")
        self.model = self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.processor = from_pretrained(Owlv2Processor, path, "geneval detector processor")
        self.clip = None
        if clip is not None:
            from ._clip import CLIPScorer
            self.clip = CLIPScorer.load(clip, None, what="geneval colour CLIP", device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------------------------- detection
    def queries(self, metadata: list[dict]) -> list[str]:
        """The class vocabulary for a batch: metadata classes (first-seen order), plus the fixed list."""
        names = [c for m in metadata for c in clause_classes(m)]
        if self.vocabulary == "coco":
            names = list(COCO_CLASSES) + names
        elif isinstance(self.vocabulary, (list, tuple)):
            names = list(self.vocabulary) + names
        return list(dict.fromkeys(names))

    @torch.no_grad()
    def raw_detections(self, images: torch.Tensor, classes: list[str]) -> list[dict[str, np.ndarray]]:
        """Every OWLv2 box of each image: ``scores`` (P,), ``labels`` (P,) indexing ``classes``, ``boxes`` (P,4)
        xyxy in [0,1] of the (unpadded) image."""
        arrs = to_uint8(images)
        H, W = arrs.shape[1:3]
        texts = [QUERY.format(c) for c in classes]
        inputs = self.processor(text=[texts] * len(arrs), images=[Image.fromarray(a) for a in arrs],
                                return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        inputs = {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device))
                  for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        out = self.model(**inputs)
        probs = torch.sigmoid(out.logits.float())  # (B, P, Q)
        scores, labels = probs.max(-1)
        cx, cy, w, h = out.pred_boxes.float().unbind(-1)
        # OWLv2 pads to a square (bottom/right) before resizing: box fractions are of the padded side
        side = max(H, W)
        boxes = torch.stack([(cx - w / 2) * side / W, (cy - h / 2) * side / H,
                             (cx + w / 2) * side / W, (cy + h / 2) * side / H], -1).clamp(0, 1)
        return [{"scores": s.cpu().numpy(), "labels": lab.cpu().numpy(), "boxes": b.cpu().numpy()}
                for s, lab, b in zip(scores, labels, boxes)]

    def threshold_for(self, meta: dict) -> float:
        return self.counting_threshold if meta.get("tag") == "counting" else self.threshold

    def select(self, raw: dict[str, np.ndarray], classes: list[str], meta: dict) -> list[dict]:
        """GenEval's selection: score above the tag's threshold, per-class NMS, at most ``max_objects`` per class,
        best first. Colours are not set here (``None``)."""
        thr = self.threshold_for(meta)
        dets = []
        for ci in np.unique(raw["labels"]):
            idx = np.nonzero((raw["labels"] == ci) & (raw["scores"] > thr))[0]
            if not len(idx):
                continue
            keep = nms(raw["boxes"][idx], raw["scores"][idx], self.nms_iou)[: self.max_objects]
            for j in idx[keep]:
                b = raw["boxes"][j]
                dets.append({"cls": classes[ci], "color": None, "score": float(raw["scores"][j]),
                             "bbox": tuple(float(v) for v in b),
                             "centroid": (float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2)})
        return sorted(dets, key=lambda d: -d["score"])

    def color_candidates(self, meta: dict) -> list[str]:
        asked = [c["color"] for c in list(meta["include"]) + list(meta.get("exclude", [])) if "color" in c]
        return list(dict.fromkeys(list(GENEVAL_COLORS) + asked))

    def classify_colors(self, image: torch.Tensor, dets: list[dict], meta: dict) -> None:
        """Set ``color`` of the detections whose class a colour clause of ``meta`` mentions."""
        want = [d for d in dets if d["cls"] in color_classes(meta)]
        if not want:
            return
        cands = self.color_candidates(meta)
        if self.clip is None:
            arr = to_uint8(image[None])[0]
            for d in want:
                d["color"] = mean_color_name(arr, d["bbox"], cands)
            return
        H, W = image.shape[-2:]
        feats = []
        for d in want:
            x0, y0, x1, y1 = d["bbox"]
            xa, ya = int(x0 * W), int(y0 * H)
            crop = image[None, :, ya:max(int(np.ceil(y1 * H)), ya + 1), xa:max(int(np.ceil(x1 * W)), xa + 1)]
            feats.append(self.clip.image_features(crop))
        img = torch.cat(feats)
        for d, f in zip(want, img):
            txt = self.clip.text_features([f"a photo of a {c} {d['cls']}" for c in cands])
            d["color"] = cands[int((txt @ f).argmax())]

    def detect(self, images: torch.Tensor, metadata: list[dict]) -> list[list[dict]]:
        """Judge-ready detections per image."""
        classes = self.queries(metadata)
        out = []
        for img, raw, meta in zip(images, self.raw_detections(images, classes), metadata):
            dets = self.select(raw, classes, meta)
            self.classify_colors(img, dets, meta)
            out.append(dets)
        return out

    # ------------------------------------------------------------------------------------- judging
    def judge_detections(self, metadata: list[dict], detections: list[list]) -> dict[str, torch.Tensor]:
        """Rewards from detections (ours or hand-made) with the evaluator's rules."""
        from flowalign.eval.geneval import judge
        verdicts = [judge(m, d) for m, d in zip(metadata, detections)]
        correct = torch.tensor([float(c) for c, _ in verdicts])
        partial = torch.tensor([float(p) for _, p in verdicts])
        return {"reward": partial if self.mode == "partial" else correct, "correct": correct, "partial": partial,
                "n_detections": torch.tensor([float(len(d)) for d in detections])}

    def score(self, images, prompts, metadata):
        from flowalign.eval.geneval import MetadataError, validate_metadata
        for i, m in enumerate(metadata):
            try:
                validate_metadata(m, f"geneval reward metadata record {i}")
            except MetadataError as e:
                raise RewardError(f"{e} (the geneval reward needs GenEval records, not plain prompts)") from None
        return self.judge_detections(metadata, self.detect(images, metadata))


@register("geneval")
def _build(path: str = "google/owlv2-base-patch16-ensemble", clip: str | None = None,
           vocabulary: str | list[str] = "batch", threshold: float = THRESHOLD,
           counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS, nms_iou: float = 0.5,
           mode: str = "partial", device: str = "cpu", dtype="float32", batch_size: int = 16) -> GenEvalReward:
    return GenEvalReward(path=path, clip=clip, vocabulary=vocabulary, threshold=threshold,
                         counting_threshold=counting_threshold, max_objects=max_objects, nms_iou=nms_iou, mode=mode,
                         device=device, dtype=dtype, batch_size=batch_size)
