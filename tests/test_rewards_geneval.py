"""GenEval detector reward: a tiny random OWLv2 (plumbing, thresholds, NMS, box geometry), hand-made detections
through the evaluator's judge, and the colour rules on rendered ShapeWorld scenes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.eval.geneval import judge
from flowalign.rewards import RewardError, build_reward, to_tensor
from flowalign.rewards import tiny
from flowalign.rewards.geneval import COCO_CLASSES, box_iou, mean_color_name, nms
from flowalign.shapeworld.detector import detect as shapeworld_detect
from flowalign.shapeworld.world import COLORS, render

COUNT = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}],
         "prompt": "a photo of two circles"}
COLOR = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}],
         "prompt": "a photo of a red square"}
TWO = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "cross", "count": 1}],
       "prompt": "a photo of a circle and a cross"}
POS = {"tag": "position", "include": [{"class": "circle", "count": 1},
                                      {"class": "square", "count": 1, "position": ["left of", 0]}],
       "prompt": "a photo of a square left of a circle"}


@pytest.fixture(scope="session")
def owl_dir(tmp_path_factory):
    return tiny.save_tiny_owlv2(tmp_path_factory.mktemp("owlv2"), seed=0)


@pytest.fixture(scope="session")
def geneval(owl_dir):
    return build_reward("geneval", path=str(owl_dir))


def det(cls, x, y, color=None, score=0.9, half=0.05):
    return {"cls": cls, "color": color, "score": score, "centroid": (x, y), "bbox": (x - half, y - half, x + half, y + half)}


# ------------------------------------------------------------------------------------------ tiny OWLv2
def test_raw_detections_shapes_and_geometry(geneval):
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    classes = geneval.queries([COUNT, COLOR])
    assert classes == ["circle", "square"]
    raw = geneval.raw_detections(x, classes)
    assert len(raw) == 2
    for r in raw:
        assert r["scores"].shape == (16,) and r["labels"].shape == (16,) and r["boxes"].shape == (16, 4)  # 4x4 patches
        assert ((r["scores"] >= 0) & (r["scores"] <= 1)).all() and set(r["labels"]) <= {0, 1}
        b = r["boxes"]
        assert ((b >= 0) & (b <= 1)).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    # deterministic
    again = geneval.raw_detections(x, classes)
    assert all(np.array_equal(a["scores"], b["scores"]) for a, b in zip(raw, again))


def test_vocabulary_options(owl_dir):
    coco = build_reward("geneval", path=str(owl_dir), vocabulary="coco")
    q = coco.queries([COUNT])
    assert q[:80] == list(COCO_CLASSES) and q[-1] == "circle" and len(q) == 81
    fixed = build_reward("geneval", path=str(owl_dir), vocabulary=["dog", "circle"])
    assert fixed.queries([COUNT, TWO]) == ["dog", "circle", "cross"]
    with pytest.raises(RewardError, match="vocabulary must be"):
        build_reward("geneval", path=str(owl_dir), vocabulary="lvis")
    with pytest.raises(RewardError, match="threshold must be a number in"):
        build_reward("geneval", path=str(owl_dir), threshold=3)


def test_select_applies_geneval_thresholds_nms_and_cap(geneval):
    raw = {"scores": np.array([0.95, 0.5, 0.92, 0.2, 0.94, 0.6]),
           "labels": np.array([0, 0, 0, 0, 1, 1]),
           "boxes": np.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.01, 0.0, 0.21, 0.2],
                              [0.3, 0.3, 0.4, 0.4], [0.8, 0.8, 0.9, 0.9], [0.1, 0.6, 0.2, 0.7]])}
    classes = ["circle", "square"]
    # non-counting: threshold 0.3; box 2 overlaps box 0 (IoU ~0.9) and is suppressed by NMS
    d = geneval.select(raw, classes, TWO)
    assert [(x["cls"], x["score"]) for x in d] == [("circle", 0.95), ("square", 0.94), ("square", 0.6),
                                                   ("circle", 0.5)]
    assert d[0]["centroid"] == pytest.approx((0.1, 0.1)) and d[0]["bbox"] == pytest.approx((0, 0, 0.2, 0.2))
    # counting: threshold 0.9
    d = geneval.select(raw, classes, COUNT)
    assert [(x["cls"], x["score"]) for x in d] == [("circle", 0.95), ("square", 0.94)]
    try:  # without NMS (GenEval's NMS_THRESHOLD = 1.0) the duplicate survives; max_objects caps per class
        geneval.nms_iou, geneval.max_objects = 1.0, 2
        d = geneval.select(raw, classes, TWO)
        assert [x["score"] for x in d if x["cls"] == "circle"] == [0.95, 0.92]
    finally:
        geneval.nms_iou, geneval.max_objects = 0.5, 16


def test_select_on_real_model_output(geneval):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    classes = ["circle", "square"]
    raw = geneval.raw_detections(x, classes)[0]
    thr = float(np.median(raw["scores"]))
    try:
        geneval.threshold, geneval.nms_iou = thr, 1.0
        d = geneval.select(raw, classes, TWO)
    finally:
        geneval.threshold, geneval.nms_iou = 0.3, 0.5
    assert len(d) == int((raw["scores"] > thr).sum()) and all(x["score"] > thr for x in d)
    assert [x["score"] for x in d] == sorted((x["score"] for x in d), reverse=True)


def test_reward_is_judge_on_detections(geneval):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    meta = [COUNT, COLOR, TWO]
    geneval.threshold = 0.0  # let the random model's boxes through so the judge sees non-empty lists
    try:
        dets = geneval.detect(x, meta)
        out = geneval(x, [m["prompt"] for m in meta], meta)
    finally:
        geneval.threshold = 0.3
    assert all({"cls", "color", "centroid", "score", "bbox"} <= set(d) for ds in dets for d in ds)
    # colours are set exactly for classes a colour clause asks about
    assert all((d["color"] is not None) == (d["cls"] == "square") for d in dets[1])
    assert all(d["color"] is None for d in dets[0] + dets[2])
    expect = [judge(m, d) for m, d in zip(meta, dets)]
    assert out["partial"].tolist() == pytest.approx([p for _, p in expect])
    assert out["correct"].tolist() == [float(c) for c, _ in expect]
    assert out["n_detections"].tolist() == [len(d) for d in dets]
    assert torch.equal(out["reward"], out["partial"])
    with pytest.raises(RewardError, match="needs metadata"):
        geneval(x, ["a"] * 3)
    with pytest.raises(RewardError, match="record 1: missing key 'include'"):
        geneval(x, ["a"] * 3, [COUNT, {"tag": "prompt", "prompt": "a"}, TWO])


def test_hand_made_detections_through_the_judge(owl_dir):
    g = build_reward("geneval", path=str(owl_dir), mode="binary")
    dets = [
        [det("circle", 0.3, 0.5), det("circle", 0.7, 0.5)],            # counting: exactly two -> correct
        [det("circle", 0.3, 0.5)],                                       # counting: one of two -> partial 0.5
        [det("square", 0.5, 0.5, color="blue")],                         # wrong colour: count ok, colour 0
        [det("circle", 0.3, 0.5)],                                       # two_object: cross missing
        [det("circle", 0.7, 0.5), det("square", 0.2, 0.5)],              # square left of circle: correct
        [det("circle", 0.2, 0.5), det("square", 0.7, 0.5)],              # square right of circle: position fails
    ]
    meta = [COUNT, COUNT, COLOR, TWO, POS, POS]
    out = g.judge_detections(meta, dets)
    assert out["correct"].tolist() == [1, 0, 0, 0, 1, 0]
    assert out["partial"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 1.0, 2 / 3])
    assert torch.equal(out["reward"], out["correct"])


def test_box_iou_and_nms():
    a = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6]], float)
    assert box_iou(a, a)[0, 1] == pytest.approx(1 / 7) and box_iou(a, a)[0, 2] == 0
    assert nms(a, np.array([0.5, 0.9, 0.1]), 0.1) == [1, 2]
    assert nms(a, np.array([0.5, 0.9, 0.1]), 0.2) == [1, 0, 2]
    assert nms(a, np.array([0.5, 0.9, 0.1]), 1.0) == [1, 0, 2]


# ------------------------------------------------------------------------------------------------ colour
@pytest.mark.parametrize("color", list(COLORS))
@pytest.mark.parametrize("shape", ["circle", "triangle", "cross"])
def test_mean_colour_fallback_on_shapeworld_scenes(shape, color):
    other = "blue" if color != "blue" else "red"
    img = np.asarray(render([{"shape": shape, "x": 0.3, "y": 0.5, "r": 0.18, "color": color},
                             {"shape": "square", "x": 0.75, "y": 0.3, "r": 0.12, "color": other}], size=64))
    boxes = {(d.cls, d.color): d.bbox for d in shapeworld_detect(img)}
    bbox = boxes[(shape, color)]
    cands = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    assert mean_color_name(img, bbox, cands) == color
    assert mean_color_name(img, boxes[("square", other)], cands) == other


def test_clip_colour_path_returns_candidates(owl_dir, tmp_path):
    clip_dir = tiny.save_tiny_clip(tmp_path / "clip", seed=0)
    g = build_reward("geneval", path=str(owl_dir), clip=str(clip_dir), threshold=0.0)
    img = to_tensor([np.asarray(render([{"shape": "square", "x": 0.5, "y": 0.5, "r": 0.2, "color": "red"}], size=32))])
    dets = g.detect(img, [COLOR])[0]
    squares = [d for d in dets if d["cls"] == "square"]
    assert squares and all(d["color"] in g.color_candidates(COLOR) for d in squares)
    assert "red" in g.color_candidates({"tag": "colors", "include": [{"class": "x", "count": 1, "color": "red"}]})
    assert g.color_candidates({"tag": "c", "include": [{"class": "x", "count": 1, "color": "teal"}]})[-1] == "teal"
