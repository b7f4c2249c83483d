"""A T2I-CompBench-style suite: its categories, its prompt-file layout, and its scoring rules with exact ShapeWorld
judges or pluggable real scorers.

**Layout** (T2I-CompBench's own): a directory of text files ``{category}_val.txt``, one prompt a line (blank lines
ignored). ``load_compbench(path)`` takes that directory (every ``*_val.txt`` in it) or one such file; each prompt
becomes ``images_per_prompt`` records ``{"tag": category, "prompt", "copy": j}`` (record i is sampled from the noise
of seed + i, as in the GenEval suite). Known categories: ``color``, ``shape``, ``texture`` (attribute binding),
``spatial``, ``non_spatial``, ``complex``; the shipped ShapeWorld files are ``flowalign/shapeworld/data/compbench``.

**Rules** (the benchmark's, per category):

- attribute binding (``color``, ``shape``, ``texture``): the prompt's noun phrases ("a red circle", "a blue
  square") are asked one by one and the image's score is the **product** over phrases of P(yes). BLIP-VQA gives
  P(yes) on real images (``BlipVQA``). On ShapeWorld the detector is the oracle: P(yes) = 1 when at least the
  phrase's count of detections has its shape (and colour), else 0; so the score is 1 exactly when every phrase is
  present (extra objects cost nothing, unlike GenEval's counts).
- ``spatial`` (2-D): subject = first phrase, reference = last; each is its class's most confident detection. The
  image scores ``0.25 c_subject + 0.25 c_reference + 0.5 position`` when both are found, ``0.25 c`` when one is, 0
  when neither; a total under 0.5 is set to 0 (T2I-CompBench++'s detector rule). ``position`` (``position_score``):
  the relation holds on the dominant axis (|dx| > |dy| for left/right, |dy| > |dx| for above/below) -> 1 when the
  two boxes' IoU is under 0.1, else 0.1 / IoU; a wrong relation -> 0. Exact ShapeWorld detectors have confidence 1,
  so a correct relation scores 1 (0.5 + 0.5 x position with overlapping boxes), a wrong one with both objects present
  0.5, a missing object 0. OWLv2 (the ``geneval`` reward's backend) supplies boxes and confidences on real images.
- ``non_spatial``: a CLIP score, the cosine of image and prompt embeddings: ``shapeclip`` on ShapeWorld, a CLIP
  model on real images.
- ``complex`` (3-in-1): the mean of the three scores above computed on the complex prompt (binding over its
  phrases, spatial over its relation, CLIP cosine over the whole prompt).

On ShapeWorld every detector-based score is computed under all four verdicts of ``eval.judges`` (``train``,
``train_strict``, ``heldout``, ``heldout_strict``: the strict ones count only unambiguous detections, and for a
phrase with a colour only ``color_clear`` ones); ``non_spatial`` is the same under every judge (``shapeclip``).
Each image also gets a yes/no ``verdict`` for the sample grids: binding 1, the relation right with both objects found,
complex both of those; ``non_spatial`` has none.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .geneval import MetadataError
from .judges import JUDGES

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
BINDING = ("color", "shape", "texture")
IOU_THRESHOLD = 0.1
SHAPEWORLD_COMPBENCH = "shapeworld-compbench"

# relation phrases: T2I-CompBench's (their 2-D vocabulary) and ShapeWorld's; -> the canonical relation
RELATION_PHRASES = {
    "on the left of": "left of", "to the left of": "left of", "left of": "left of",
    "on the right of": "right of", "to the right of": "right of", "right of": "right of",
    "on the top of": "above", "on top of": "above", "above": "above",
    "on the bottom of": "below", "below": "below", "under": "below",
    "next to": "next to", "near": "next to", "on side of": "next to",
}
_NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


# ----------------------------------------------------------------------------------------------------- loading
def category_of(path: Path) -> str:
    name = path.name
    for suffix in ("_val.txt", "_train.txt", "_test.txt", ".txt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_compbench(spec, images_per_prompt: int = 4, n_per_task: int | None = None) -> list[dict]:
    """Records of a T2I-CompBench-layout directory (every ``*_val.txt``, in ``CATEGORIES`` order) or one file.
    ``n_per_task``: at most this many records per category (the first prompts first)."""
    from flowalign.shapeworld.compbench import COMPBENCH_DIR

    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1, got {images_per_prompt}")
    path = COMPBENCH_DIR if spec == SHAPEWORLD_COMPBENCH else Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*_val.txt"), key=lambda p: (CATEGORIES.index(category_of(p))
                                                              if category_of(p) in CATEGORIES else 99, p.name))
        if not files:
            raise MetadataError(f"{path}: no T2I-CompBench prompt files (*_val.txt) in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"T2I-CompBench prompt directory or file not found: {path}")
    out = []
    for f in files:
        cat = category_of(f)
        prompts = [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if not prompts:
            raise MetadataError(f"{f}: no prompts")
        recs = [{"tag": cat, "prompt": p, "copy": j} for p in prompts for j in range(images_per_prompt)]
        out += recs[:n_per_task] if n_per_task else recs
    return out


# ----------------------------------------------------------------------------------------------------- parsing
def _strip(prompt: str) -> str:
    p = prompt.strip().rstrip(".").strip()
    p = re.sub(r"^(a photo of|an image of|a picture of)\s+", "", p, flags=re.I)
    return p


def split_relation(prompt: str) -> tuple[str, str | None, str | None]:
    """(subject text, canonical relation, reference text) for the longest relation phrase found; (text, None, None)
    when there is none."""
    p = _strip(prompt)
    for phrase in sorted(RELATION_PHRASES, key=len, reverse=True):
        m = re.search(rf"\s{re.escape(phrase)}\s", f" {p} ")
        if m:
            a, b = f" {p} "[: m.start()].strip(), f" {p} "[m.end():].strip()
            if a and b:
                return a, RELATION_PHRASES[phrase], b
    return p, None, None


def noun_phrases(prompt: str) -> list[str]:
    """The phrases attribute binding asks about, in order: the prompt without its "a photo of" lead, split at a
    relation phrase and at " and " (T2I-CompBench takes spaCy's noun chunks; for its "a green bench and a red car"
    prompts and ShapeWorld's these are the same phrases)."""
    a, rel, b = split_relation(prompt)
    parts = [a, b] if rel else [a]
    out = []
    for part in parts:
        out += [q.strip() for q in re.split(r"\s+and\s+|,\s*", part) if q.strip()]
    return out


def head_noun(phrase: str) -> str:
    """The class a detector is asked for: the phrase's last word (T2I-CompBench takes spaCy's nouns)."""
    words = re.findall(r"[A-Za-z][\w-]*", phrase)
    return words[-1] if words else phrase


def parse_shapeworld_phrase(phrase: str) -> dict:
    """``a red circle`` / ``a circle`` / ``three crosses`` -> ``{"shape", "color" (or None), "count"}``."""
    from flowalign.shapeworld.world import COLORS, PLURAL, SHAPES

    words = phrase.lower().split()
    singular = {PLURAL[s]: s for s in SHAPES}
    if not words:
        raise MetadataError("empty phrase in a ShapeWorld prompt")
    count = 1
    if words[0] in ("a", "an"):
        words = words[1:]
    elif words[0] in _NUM:
        count, words = _NUM[words[0]], words[1:]
    color = words[0] if len(words) == 2 and words[0] in COLORS else None
    noun = words[-1] if words else ""
    shape = noun if noun in SHAPES else singular.get(noun)
    if shape is None or len(words) > 2 or (len(words) == 2 and color is None):
        raise MetadataError(f"not a ShapeWorld phrase: {phrase!r} (want e.g. 'a red circle' or 'three crosses')")
    return {"shape": shape, "color": color, "count": count}


def parse_shapeworld_prompt(prompt: str) -> dict:
    """``{"phrases": [parsed phrase, ...], "relation": canonical relation or None}`` (subject first)."""
    _, rel, _ = split_relation(prompt)
    return {"phrases": [parse_shapeworld_phrase(p) for p in noun_phrases(prompt)], "relation": rel}


# ----------------------------------------------------------------------------------------------------- rules
def _g(d, k, default=None):
    return d.get(k, default) if isinstance(d, dict) else getattr(d, k, default)


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def position_score(relation: str, box_subject, box_reference, iou_threshold: float = IOU_THRESHOLD) -> float:
    """T2I-CompBench's 2-D position score of subject relative to reference (boxes x0, y0, x1, y1; y down)."""
    cs = ((box_subject[0] + box_subject[2]) / 2, (box_subject[1] + box_subject[3]) / 2)
    cr = ((box_reference[0] + box_reference[2]) / 2, (box_reference[1] + box_reference[3]) / 2)
    dx, dy = cr[0] - cs[0], cr[1] - cs[1]  # reference minus subject, as the benchmark measures
    iou = box_iou(box_subject, box_reference)
    ok = {"left of": dx > 0 and abs(dx) > abs(dy), "right of": dx < 0 and abs(dx) > abs(dy),
          "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}
    if relation not in ok:
        raise ValueError(f"unknown 2-D relation {relation!r}; known: {', '.join(ok)}")
    if not ok[relation]:
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(relation: str, subject, reference) -> tuple[float, float]:
    """(score, position) from the subject's and reference's chosen detections (``None`` when not found), each
    with ``bbox`` and ``confidence``."""
    if subject is not None and reference is not None:
        pos = position_score(relation, _g(subject, "bbox"), _g(reference, "bbox"))
        s = 0.25 * _g(subject, "confidence", 1.0) + 0.25 * _g(reference, "confidence", 1.0) + 0.5 * pos
    elif subject is not None or reference is not None:
        pos, s = 0.0, 0.25 * _g(subject if subject is not None else reference, "confidence", 1.0)
    else:
        pos, s = 0.0, 0.0
    return (0.0 if s < 0.5 else float(s)), float(pos)


def _matches(d, phrase: dict, strict: bool) -> bool:
    if _g(d, "cls") != phrase["shape"]:
        return False
    if strict and not _g(d, "unambiguous", True):
        return False
    if phrase.get("color") is not None:
        return _g(d, "color") == phrase["color"] and (not strict or _g(d, "color_clear", True))
    return True


def binding_score(phrases: Sequence[dict], dets: Sequence, strict: bool = False) -> float:
    """Product over phrases of 1[at least ``count`` detections match the phrase's shape (and colour)]."""
    out = 1.0
    for ph in phrases:
        out *= float(sum(_matches(d, ph, strict) for d in dets) >= ph.get("count", 1))
    return out


def pick(dets: Sequence, shape: str, strict: bool = False):
    """The detection of a class a spatial rule uses: the highest-scoring one (None when there is none)."""
    c = [d for d in dets if _g(d, "cls") == shape and (not strict or _g(d, "unambiguous", True))]
    return max(c, key=lambda d: _g(d, "score", 0.0)) if c else None


def shapeworld_spatial(parsed: dict, dets: Sequence, strict: bool = False) -> tuple[float, float]:
    ph = parsed["phrases"]
    if parsed["relation"] is None or len(ph) < 2:
        raise MetadataError(f"a spatial prompt needs a relation between two phrases, got {parsed}")
    s, r = pick(dets, ph[0]["shape"], strict), pick(dets, ph[-1]["shape"], strict)
    wrap = (lambda d: None if d is None else {"bbox": _g(d, "bbox"), "confidence": 1.0})
    return spatial_score(parsed["relation"], wrap(s), wrap(r))


def shapeworld_scores(category: str, prompt: str, dets: Sequence, strict: bool,
                      cosine: float) -> tuple[float, bool | None]:
    """(score, verdict) of one ShapeWorld image under one detector's detections."""
    parsed = parse_shapeworld_prompt(prompt)
    if category in BINDING:
        b = binding_score(parsed["phrases"], dets, strict)
        return b, b == 1.0
    if category == "spatial":
        s, pos = shapeworld_spatial(parsed, dets, strict)
        return s, pos == 1.0
    if category == "non_spatial":
        return float(cosine), None
    if category == "complex":
        b = binding_score(parsed["phrases"], dets, strict)
        s, pos = shapeworld_spatial(parsed, dets, strict) if parsed["relation"] in ("left of", "right of", "above",
                                                                                  "below") else (0.0, 0.0)
        return float(np.mean([b, s, cosine])), bool(b == 1.0 and pos == 1.0)
    raise MetadataError(f"no ShapeWorld rule for T2I-CompBench category {category!r}; known: "
                        f"{', '.join(c for c in CATEGORIES if c != 'texture')}")


def check_shapeworld_records(records: Sequence[dict]) -> None:
    """Fail early (one line) on a prompt or category the ShapeWorld rules cannot score."""
    for r in records:
        if r["tag"] == "texture" or r["tag"] not in CATEGORIES:
            raise MetadataError(f"no ShapeWorld rule for T2I-CompBench category {r['tag']!r} (ShapeWorld has no "
                                f"textures); known: color, shape, spatial, non_spatial, complex")
        parsed = parse_shapeworld_prompt(r["prompt"])
        if r["tag"] in ("spatial", "complex") and parsed["relation"] not in ("left of", "right of", "above", "below"):
            raise MetadataError(f"{r['tag']} prompt {r['prompt']!r} has no 2-D relation (left of / right of / above "
                                f"/ below)")


def score_shapeworld(records: Sequence[dict], images: np.ndarray, shapeclip=None) -> list[dict]:
    """Per image: ``{"scores": {judge: score}, "verdicts": {judge: bool or None}, "cosine"}`` under all four
    judges. ``shapeclip``: a ``ShapeClipReward`` (default: the shipped one)."""
    from flowalign.shapeworld import detector, geometry_judge

    if len(records) != len(images):
        raise ValueError(f"got {len(records)} records but {len(images)} images")
    check_shapeworld_records(records)
    cos = [0.0] * len(records)
    if any(r["tag"] in ("non_spatial", "complex") for r in records):
        if shapeclip is None:
            from flowalign.rewards import build_reward
            shapeclip = build_reward("shapeclip")
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            cos = shapeclip(x, [r["prompt"] for r in records])["cosine"].tolist()
    out = []
    for r, img, c in zip(records, images, cos):
        dt, dg = detector.detect(img), geometry_judge.detect(img)
        scores, verdicts = {}, {}
        for j in JUDGES:
            dets = dt if j.startswith("train") else dg
            scores[j], verdicts[j] = shapeworld_scores(r["tag"], r["prompt"], dets, j.endswith("strict"), c)
        out.append({"scores": scores, "verdicts": verdicts, "cosine": float(c)})
    return out


# ----------------------------------------------------------------------------------------------- real scorers
class BlipVQA:
    """P(yes) of BLIP-VQA (transformers ``BlipForQuestionAnswering`` + ``BlipProcessor``; default
    ``Salesforce/blip-vqa-base``, a local directory works the same) for a question about an image: the decoder's
    first-token probabilities of "yes" and "no" after the BOS token, renormalised over the two (ranking the two
    candidate answers, as the benchmark's BLIP-VQA does)."""

    def __init__(self, path: str = "Salesforce/blip-vqa-base", device: str = "cpu", batch_size: int = 32):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        from flowalign.rewards._common import from_pretrained

        self.model = from_pretrained(BlipForQuestionAnswering, path, "BLIP-VQA model").to(device).eval()
        self.processor = from_pretrained(BlipProcessor, path, "BLIP-VQA processor")
        tok = self.processor.tokenizer
        self.yes, self.no = (tok(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def p_yes(self, images: Sequence, questions: Sequence[str]) -> np.ndarray:
        """P(yes) per (image, question). Questions are batched only with questions of the same token length, so
        no padding enters a batch and a question's answer never depends on what it was batched with (with padding,
        transformers' BLIP decoder gave answers that moved by ~1e-4 with the batch)."""
        from PIL import Image

        tok = self.processor.tokenizer
        lengths = [len(tok(q).input_ids) for q in questions]
        out = np.zeros(len(questions))
        for L in sorted(set(lengths)):
            group = [k for k, n in enumerate(lengths) if n == L]
            for i in range(0, len(group), self.batch_size):
                idx = group[i:i + self.batch_size]
                ims = [Image.fromarray(np.asarray(images[k])) for k in idx]
                enc = self.processor(images=ims, text=[questions[k] for k in idx], return_tensors="pt")
                out[idx] = self._p_yes(enc)
        return out

    def _p_yes(self, enc) -> np.ndarray:
        m = self.model
        img = m.vision_model(pixel_values=enc["pixel_values"].to(self.device)).last_hidden_state
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        q = m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                           encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long, device=self.device))[0]
        bos = torch.full((len(ids), 1), m.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = m.text_decoder(input_ids=bos, encoder_hidden_states=q, encoder_attention_mask=mask).logits[:, 0]
        two = torch.stack([logits[:, self.yes], logits[:, self.no]], -1).float().softmax(-1)
        return two[:, 0].cpu().numpy()

    def binding(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        """Product over each prompt's noun phrases of P(yes | "{phrase}?")."""
        qs, owner = [], []
        for k, p in enumerate(prompts):
            for ph in noun_phrases(p):
                qs.append(f"{ph}?")
                owner.append(k)
        py = self.p_yes([images[k] for k in owner], qs)
        out = np.ones(len(prompts))
        for k, v in zip(owner, py):
            out[k] *= float(v)
        return out


class OwlSpatial:
    """The spatial rule on OWLv2 detections (the ``geneval`` reward's detector backend: queries, threshold, NMS):
    each phrase's head noun is a class; its most confident box is the object, the box's score its confidence."""

    def __init__(self, path: str = "google/owlv2-base-patch16-ensemble", device: str = "cpu", threshold: float = 0.1):
        from flowalign.rewards.geneval import GenEvalReward

        self.det = GenEvalReward(path=path, device=device, threshold=threshold, counting_threshold=threshold)

    def scores(self, images: Sequence, prompts: Sequence[str]) -> list[tuple[float, float]]:
        x = torch.from_numpy(np.stack([np.asarray(a) for a in images])).permute(0, 3, 1, 2).float() / 255
        out = []
        for img, p in zip(x, prompts):
            subj, rel, ref = split_relation(p)
            if rel is None or rel == "next to":
                out.append((0.0, 0.0))
                continue
            a, b = head_noun(noun_phrases(subj)[-1]), head_noun(noun_phrases(ref)[0])
            classes = list(dict.fromkeys([a, b]))
            raw = self.det.raw_detections(img[None], classes)[0]
            dets = self.det.select(raw, classes, {"tag": "spatial"})
            best = {}
            for d in dets:  # sorted best first
                best.setdefault(d["cls"], {"bbox": d["bbox"], "confidence": d["score"]})
            out.append(spatial_score(rel, best.get(a), best.get(b)))
        return out


class RealCompBench:
    """T2I-CompBench's scorers on real images: BLIP-VQA (attribute binding), OWLv2 (spatial), CLIP (non-spatial),
    their mean (complex). Each model is a hub id or a local directory; a scorer that is not configured makes its
    categories fail with one line naming the option."""

    def __init__(self, blip: str | None = None, owl: str | None = None, clip: str | None = None, device: str = "cpu"):
        self.blip = BlipVQA(blip, device) if blip else None
        self.owl = OwlSpatial(owl, device) if owl else None
        self.clip = None
        if clip:
            from flowalign.rewards._clip import CLIPScorer
            self.clip = CLIPScorer.load(clip, None, what="CompBench CLIP", device=device)

    def _need(self, what, obj, cat):
        if obj is None:
            raise MetadataError(f"T2I-CompBench category {cat!r} needs the {what} scorer (--compbench-{what} "
                                f"PATH_OR_HUB_ID)")

    def score(self, records: Sequence[dict], images: np.ndarray) -> list[dict]:
        cats = {r["tag"] for r in records}
        for c in cats:
            if c not in CATEGORIES:
                raise MetadataError(f"unknown T2I-CompBench category {c!r}; known: {', '.join(CATEGORIES)}")
            if c in BINDING + ("complex",):
                self._need("blip", self.blip, c)
            if c in ("spatial", "complex"):
                self._need("owl", self.owl, c)
            if c in ("non_spatial", "complex"):
                self._need("clip", self.clip, c)
        prompts = [r["prompt"] for r in records]
        n = len(records)
        b = self.blip.binding(images, prompts) if self.blip and cats & set(BINDING + ("complex",)) else np.zeros(n)
        sp = self.owl.scores(images, prompts) if self.owl and cats & {"spatial", "complex"} else [(0.0, 0.0)] * n
        cos = np.zeros(n)
        if self.clip and cats & {"non_spatial", "complex"}:
            x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                cos = self.clip.cosine(x, prompts).cpu().numpy()
        out = []
        for k, r in enumerate(records):
            c = r["tag"]
            if c in BINDING:
                s, v = float(b[k]), bool(b[k] >= 0.5)
            elif c == "spatial":
                s, v = float(sp[k][0]), bool(sp[k][1] == 1.0)
            elif c == "non_spatial":
                s, v = float(cos[k]), None
            else:
                s, v = float(np.mean([b[k], sp[k][0], cos[k]])), None
            out.append({"scores": {"real": s}, "verdicts": {"real": v}, "cosine": float(cos[k])})
        return out
