"""ShapeWorld: prompt files are GenEval metadata, the detector is right on renders, the evaluator's verdicts."""
import json

import numpy as np
import pytest

from flowalign.eval.geneval import MetadataError, judge, load_metadata, score_images, validate_metadata
from flowalign.shapeworld import prompts as P
from flowalign.shapeworld.detector import Detection, detect
from flowalign.shapeworld.world import TASKS, blur_and_noise, make_metadata, render, render_batch


@pytest.mark.parametrize("name", ["train", "test", "test_unseen"])
def test_shipped_prompt_files_are_geneval_metadata(name):
    metas = load_metadata(P.prompt_file(name))
    for m in metas:
        assert set(m) <= {"tag", "include", "exclude", "prompt"}
        assert m["tag"] in TASKS
        if m["tag"] == "position":
            assert "position" not in m["include"][0] and m["include"][1]["position"][1] == 0
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if m["tag"] in ("colors", "color_attr"):
            assert all("color" in c for c in m["include"])
    if name == "test":
        assert {t: sum(m["tag"] == t for m in metas) for t in TASKS} == {t: 100 for t in TASKS}


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    paths = P.write_prompt_files(tmp_path)
    for name, p in paths.items():
        assert p.read_text() == P.prompt_file(name).read_text()


def test_unseen_combinations_never_appear_in_training():
    train = {m["prompt"] for m in load_metadata(P.prompt_file("train"))}
    unseen = load_metadata(P.prompt_file("test_unseen"))
    assert {m["tag"] for m in unseen} == {"color_attr", "position"}
    assert not any(m["prompt"] in train for m in unseen)
    test = load_metadata(P.prompt_file("test"))
    assert all(m["prompt"] in train for m in test)


def test_official_geneval_lines_parse_unchanged(tmp_path):
    lines = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
         "prompt": "a photo of two clocks"},
        {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["right of", 0]}],
         "prompt": "a photo of a dog right of a teddy bear"},
        {"tag": "color_attr", "include": [{"class": "oven", "count": 1, "color": "purple"},
                                          {"class": "bed", "count": 1, "color": "pink"}],
         "prompt": "a photo of a purple oven and a pink bed"},
    ]
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert load_metadata(f) == lines


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "not valid JSON"),
    ('{"tag": "single_object", "prompt": "x"}', "missing key 'include'"),
    ('{"tag": "t", "include": [{"class": "a", "count": 0}], "prompt": "x"}', "bad count"),
    ('{"tag": "t", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}], '
     '"prompt": "x"}', "bad position"),
])
def test_malformed_metadata_line_names_the_line(tmp_path, bad, msg):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(make_metadata("single_object", shape="circle")) + "\n" + bad + "\n")
    with pytest.raises(MetadataError, match=f"m.jsonl:2: .*{msg}"):
        load_metadata(f)


def test_detector_is_right_on_thousands_of_renders():
    imgs, metas = render_batch(2400, seed=123)
    res = score_images(metas, imgs)
    acc = np.mean([r["correct"] for r in res["per_image"]])
    assert acc >= 0.99, res["per_task"]
    assert min(res["per_task"].values()) >= 0.97


def test_detector_survives_noise_and_blur():
    imgs, metas = render_batch(600, seed=7)
    noisy = blur_and_noise(imgs)
    res = score_images(metas, noisy)
    assert np.mean([r["correct"] for r in res["per_image"]]) >= 0.95, res["per_task"]


def _scene(*objs):
    return np.asarray(render([dict(shape=s, color=c, x=x, y=y, r=0.18) for s, c, x, y in objs]))


def test_evaluator_verdicts_on_hand_made_scenes():
    pos = make_metadata("position", a="circle", b="square", rel="left of")
    assert judge(pos, detect(_scene(("circle", "red", 0.25, 0.5), ("square", "blue", 0.75, 0.5))))[0]
    ok, partial = judge(pos, detect(_scene(("circle", "red", 0.75, 0.5), ("square", "blue", 0.25, 0.5))))
    assert not ok and partial == pytest.approx(2 / 3)  # both objects present, relation wrong

    ca = make_metadata("color_attr", a="circle", b="square", ca="red", cb="blue")
    assert judge(ca, detect(_scene(("circle", "red", 0.25, 0.3), ("square", "blue", 0.7, 0.7))))[0]
    ok, partial = judge(ca, detect(_scene(("circle", "blue", 0.25, 0.3), ("square", "red", 0.7, 0.7))))
    assert not ok and partial == pytest.approx(0.5)  # swapped colours: shapes right, colours wrong

    cnt = make_metadata("counting", shape="triangle", n=3)
    three = [("triangle", "green", 0.2, 0.2), ("triangle", "red", 0.75, 0.25), ("triangle", "blue", 0.5, 0.75)]
    assert judge(cnt, detect(_scene(*three)))[0]
    ok, partial = judge(cnt, detect(_scene(*three, ("triangle", "yellow", 0.2, 0.75))))
    assert not ok and partial == pytest.approx(2 / 3)  # four is too many: 1 - |4-3|/3
    assert not judge(cnt, detect(_scene(*three[:2])))[0]

    single = make_metadata("colors", shape="cross", color="purple")
    assert judge(single, detect(_scene(("cross", "purple", 0.5, 0.5))))[0]
    assert not judge(single, detect(_scene(("cross", "orange", 0.5, 0.5))))[0]
    assert judge(make_metadata("two_object", a="circle", b="cross"), [])[1] == 0.0

    # GenEval counts "at least" (correct), the reward counts exactly: two circles for "a circle" earn nothing
    one = make_metadata("single_object", shape="circle")
    assert judge(one, detect(_scene(("circle", "red", 0.25, 0.3), ("circle", "blue", 0.7, 0.7)))) == (True, 0.0)
    two = make_metadata("two_object", a="circle", b="square")
    ok, partial = judge(two, detect(_scene(("circle", "red", 0.2, 0.2), ("circle", "blue", 0.75, 0.25),
                                            ("square", "green", 0.5, 0.75))))
    assert ok and partial == pytest.approx(0.5)


def test_judge_accepts_detections_from_other_backends():
    d = [{"cls": "circle", "color": "red", "centroid": (0.2, 0.5), "score": 0.9, "bbox": (0.1, 0.4, 0.3, 0.6)},
         Detection("square", "blue", (0.6, 0.4, 0.8, 0.6), (0.7, 0.5), 0.04, 0.8)]
    assert judge(make_metadata("position", a="circle", b="square", rel="left of"), d)[0]


def test_validate_rejects_non_dict():
    with pytest.raises(MetadataError):
        validate_metadata(["x"])


def test_render_is_deterministic_and_sized():
    a, _ = render_batch(4, seed=1)
    b, _ = render_batch(4, seed=1)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


@pytest.mark.slow
def test_pretrain_script_writes_a_loadable_sd3_pipeline(tmp_path):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from flowalign.shapeworld.pretrain import Recipe, pretrain

    out = pretrain(tmp_path / "m", Recipe(vae_steps=3, vae_batch=8, steps=3, batch=8, layers=1))
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["steps"] == 3 and rec["seed"] == 0
    # no T5 in the folder: diffusers wants the absent component named explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None)
    img = pipe(prompt=["a photo of a red circle"], num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
               max_sequence_length=0, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 32, 32)
    assert [len(pipe.tokenizer(w).input_ids) for w in ("circle", "crosses", "purple")] == [3, 3, 3]


def test_dense_position_term_is_a_ramp_across_the_judges_boundary():
    pos = make_metadata("position", a="circle", b="square", rel="left of")

    def dets(cx, cy, sx=0.5, sy=0.5):
        return [{"cls": "circle", "color": "red", "centroid": (cx, cy), "score": 1.0},
                {"cls": "square", "color": "blue", "centroid": (sx, sy), "score": 1.0}]

    # far on the right side: slack 0.34 -> term 1, same as the verdict
    assert judge(pos, dets(0.1, 0.5), position_ramp=0.1) == (True, pytest.approx(1.0))
    # 0.04 left of the square: inside the margin (0.06), slack -0.02 -> term 0.5 - 0.2 = 0.3; verdict still False
    ok, dense = judge(pos, dets(0.46, 0.5), position_ramp=0.1)
    assert not ok and dense == pytest.approx((1 + 1 + 0.3) / 3)
    assert judge(pos, dets(0.46, 0.5)) == (False, pytest.approx(2 / 3))
    # far enough left but the vertical offset dominates: slack = 0.30 - 0.35 = -0.05 -> term 0
    assert judge(pos, dets(0.2, 0.15, 0.5, 0.5), position_ramp=0.1)[1] == pytest.approx(2 / 3)
    # the term grows monotonically as the circle moves left across the boundary
    terms = [judge(pos, dets(x, 0.5), position_ramp=0.1)[1] for x in (0.5, 0.47, 0.44, 0.41, 0.38)]
    assert terms == sorted(terms) and terms[0] < terms[-1]


def test_dense_reward_mode_reports_both_scores():
    import torch

    from flowalign.rewards import build_reward

    r = build_reward("shapeworld", mode="dense")
    pos = make_metadata("position", a="circle", b="square", rel="left of")
    # left by 0.38 but 0.40 apart vertically: the verdict fails by 0.02, the ramp pays about 0.3 for the position term
    img = torch.from_numpy(_scene(("circle", "red", 0.30, 0.30), ("square", "blue", 0.68, 0.70))).permute(2, 0, 1)[None] / 255.0
    out = r(img, [pos["prompt"]], [pos])
    assert out["reward"].item() == pytest.approx(out["dense"].item())
    assert out["correct"].item() == 0 and out["partial"].item() == pytest.approx(2 / 3)
    assert 2 / 3 + 0.05 < out["dense"].item() < 2 / 3 + 0.25
    with pytest.raises(ValueError, match="mode must be"):
        build_reward("shapeworld", mode="soft")
