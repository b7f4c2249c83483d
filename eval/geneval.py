"""GenEval-style scoring: metadata + images + a detector backend -> per-image verdicts and per-task scores.

Rules (GenEval's, with the differences an exact detector allows, each noted):
- every ``include`` clause needs at least ``count`` detections of its class; ``exclude`` fails when there
  are ``count`` or more (so counting prompts mean "exactly N");
- colour: at least ``count`` of the class's detections have the clause's colour (GenEval classifies the
  top-``count`` boxes with CLIP; our detector knows each object's colour exactly, so we filter first);
- position: every object of the positioned clause stands in the relation to every object of the target
  clause, measured between centroids on the dominant axis with a margin (``POSITION_MARGIN`` of the
  image side). GenEval shrinks box-centre offsets by 0.1 x the box sizes; a centroid margin is the same
  idea for flat shapes.
- the task score is the mean verdict over its images; ``overall`` is the unweighted mean of the tasks.

``partial`` is the dense version used as a reward, flow_grpo's reward-server rule: the mean over clause
sub-scores of count (1 - |n-k|/k, floored at 0: extra objects of a named class cost as much as missing ones),
colour (fraction of the needed objects with the colour) and position (0/1). An "at least" count would pay a
policy for drawing more objects, which GenEval's exact counts and all-pairs position rule then punish.

``judge(meta, dets, strict=True)`` is the *strict* verdict: only unambiguous detections (``unambiguous`` true;
the ShapeWorld detectors set it) fill an ``include`` clause or take part in a position, while an ``exclude``
clause counts every detection that could be of its class: unambiguous ones of the class, and ambiguous ones
whose best *or runner-up* shape is the class (and whose colour matches when the clause names one). A clause
that names a colour also needs ``color_clear`` (default true) of its objects. So "exactly three crosses" fails
on three clean crosses and a fourth blob that might be a cross, and "a red square" needs a square that is
clearly a square and clearly red (a two-tone square is clearly a square for "a square and a circle").
Detections without an ``unambiguous`` key (e.g. the OWLv2 backend) cannot be judged strictly: a ``ValueError``
says so.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flowalign.shapeworld.world import RELATIONS, holds, relation_slack

POSITION_MARGIN = 0.06
REQUIRED_KEYS = ("tag", "include", "prompt")


class MetadataError(ValueError):
    pass


def validate_metadata(meta, where: str = "metadata") -> dict:
    """Check one GenEval metadata record; raise MetadataError naming the problem."""
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for k in REQUIRED_KEYS:
        if k not in meta:
            raise MetadataError(f"{where}: missing key {k!r}")
    if not isinstance(meta["include"], list) or not meta["include"]:
        raise MetadataError(f"{where}: 'include' must be a non-empty list")
    for j, clause in enumerate(list(meta["include"]) + list(meta.get("exclude", []))):
        if not isinstance(clause, dict) or "class" not in clause or "count" not in clause:
            raise MetadataError(f"{where}: clause {j} needs 'class' and 'count'")
        if not isinstance(clause["count"], int) or clause["count"] < 1:
            raise MetadataError(f"{where}: clause {j} has a bad count {clause['count']!r}")
        if "position" in clause:
            pos = clause["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < len(meta["include"])):
                raise MetadataError(f"{where}: clause {j} has a bad position {pos!r} (want [relation, index], "
                                    f"relation one of {', '.join(RELATIONS)})")
    return meta


def load_metadata(path) -> list[dict]:
    """Read a GenEval metadata .jsonl file (one JSON object per line). A .txt file is a plain prompt list (one per
    line) and becomes records ``{"tag": "prompt", "prompt": ...}`` for rewards that need no metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    if path.suffix == ".txt":
        out = [{"tag": "prompt", "prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
        if not out:
            raise MetadataError(f"{path}: no prompts")
        return out
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        out.append(validate_metadata(meta, f"{path}:{n}"))
    if not out:
        raise MetadataError(f"{path}: no metadata lines")
    return out


def _get(d, key):
    return d[key] if isinstance(d, dict) else getattr(d, key)


def _opt(d, key, default=None):
    return d.get(key, default) if isinstance(d, dict) else getattr(d, key, default)


def _unambiguous(d) -> bool:
    v = _opt(d, "unambiguous")
    if v is None:
        raise ValueError("strict judging needs detections with an 'unambiguous' flag (the ShapeWorld detectors "
                         "set it); this backend's detections have none")
    return bool(v)


def _exclusion_count(dets, clause) -> int:
    """How many detections could be an object of an exclude clause under the strict verdict."""
    n = 0
    for d in dets:
        if "color" in clause and _get(d, "color") != clause["color"]:
            continue
        if _get(d, "cls") == clause["class"] or (not _unambiguous(d) and _opt(d, "runner_up") == clause["class"]):
            n += 1
    return n


def _found(dets, clause, strict: bool = False) -> tuple[list, list]:
    of_class = [d for d in dets if _get(d, "cls") == clause["class"]]
    of_class.sort(key=lambda d: -_get(d, "score"))
    if "color" in clause:
        return of_class, [d for d in of_class if _get(d, "color") == clause["color"]
                          and (not strict or _opt(d, "color_clear", True))]
    return of_class, of_class


def judge(meta: dict, dets: Sequence, position_ramp: float = 0.0, strict: bool = False) -> tuple[bool, float]:
    """(correct, partial_credit) of one image's detections against one metadata record. With ``position_ramp`` w > 0
    the partial credit's position term is continuous: per object pair clip(0.5 + slack / w, 0, 1), slack from
    ``world.relation_slack`` (0.5 on the judge's boundary); the verdict is unchanged. ``strict``: the strict verdict
    (module docstring); the partial credit then counts unambiguous objects only."""
    all_dets = list(dets)
    if strict:
        dets = [d for d in all_dets if _unambiguous(d)]
    terms: list[float] = []
    correct = True
    groups = []
    for clause in meta["include"]:
        k = clause["count"]
        of_class, matched = _found(dets, clause, strict)
        n = len(of_class)
        terms.append(max(0.0, 1 - abs(n - k) / k))
        if "color" in clause:
            terms.append(min(len(matched), k) / k)
        if len(matched) < k:
            correct = False
        groups.append(matched[:k])
    for clause in meta.get("exclude", []):
        n = _exclusion_count(all_dets, clause) if strict else len(_found(dets, clause)[1])
        if n >= clause["count"]:
            correct = False
    for clause, group in zip(meta["include"], groups):
        if "position" not in clause:
            continue
        rel, target = clause["position"]
        ok = bool(group) and bool(groups[target]) and all(
            holds(rel, _get(a, "centroid"), _get(b, "centroid"), POSITION_MARGIN)
            for a in group for b in groups[target])
        if position_ramp > 0 and group and groups[target]:
            terms.append(float(np.mean([np.clip(0.5 + relation_slack(rel, _get(a, "centroid"), _get(b, "centroid"),
                                                                     POSITION_MARGIN) / position_ramp, 0, 1)
                                        for a in group for b in groups[target]])))
        else:
            terms.append(float(ok))
        correct = correct and ok
    return correct, float(np.mean(terms))


def score_images(metadata: Sequence[dict], images: Sequence, detector: Callable | None = None,
                 strict: bool = False) -> dict:
    """Judge images (HxWx3 uint8 arrays or PIL) against their metadata with a detector backend (``strict``: the
    strict verdict, which needs a detector that flags ambiguous objects).

    Returns ``{"per_image": [{"tag", "prompt", "correct", "partial"}], "per_task": {tag: acc}, "overall": float,
    "n_per_task": {tag: n}}``.
    """
    if detector is None:
        from flowalign.shapeworld.detector import detect as detector
    if len(metadata) != len(images):
        raise ValueError(f"got {len(metadata)} metadata records but {len(images)} images")
    per_image = []
    for meta, img in zip(metadata, images):
        ok, part = judge(meta, detector(np.asarray(img)), strict=strict)
        per_image.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": ok, "partial": part})
    return summarize(per_image)


def summarize(per_image: list[dict]) -> dict:
    tags: dict[str, list[bool]] = {}
    for r in per_image:
        tags.setdefault(r["tag"], []).append(r["correct"])
    per_task = {t: float(np.mean(v)) for t, v in tags.items()}
    return {"per_image": per_image, "per_task": per_task, "n_per_task": {t: len(v) for t, v in tags.items()},
            "overall": float(np.mean(list(per_task.values()))) if per_task else float("nan")}
