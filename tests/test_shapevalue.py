"""shapevalue: the learned ShapeWorld value reward distilled from the training judge v2 (rewards/shapevalue.py,
flowalign/shapeworld/shapevalue_train.py)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowalign.rewards import RewardError, build_reward, build_rewards
from flowalign.shapeworld import shapevalue_train as svt
from flowalign.shapeworld.world import make_metadata, render, scene_for


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sv():
    return build_reward("shapevalue")


def _img(objs) -> torch.Tensor:
    return torch.from_numpy(np.array(render(objs))).permute(2, 0, 1)[None].float() / 255


def test_metadata_encoding_by_hand():
    m = make_metadata("color_attr", a="circle", b="square", ca="red", cb="blue")
    v = svt.encode_meta(m)
    assert len(v) == svt.META_DIM == 38
    on = [i for i, x in enumerate(v) if x]
    # task color_attr = 5; entry 0: circle (6 + 0), red (10 + 0), count 1 (17 + 0); entry 1 present (21), square
    # (22 + 1), blue (26 + palette index of blue), no relation (33 + 4)
    blue = list(svt.COLOR_NAMES).index("blue")
    assert on == [5, 6, 10, 17, 21, 23, 26 + blue, 37]
    c = svt.encode_meta(make_metadata("counting", shape="cross", n=3))
    # counting = 2; cross = 6 + 3; no colour 10 + 6; count 3 = 17 + 2; no entry 1: colour none 26 + 6, relation none 37
    assert [i for i, x in enumerate(c) if x] == [2, 9, 16, 19, 32, 37]
    p = svt.encode_meta(make_metadata("position", a="triangle", b="square", rel="above"))
    assert p[21] == 1 and p[33 + 2] == 1  # entry 1 present, relation "above" (index 2 of RELATIONS)
    with pytest.raises(ValueError):
        svt.encode_meta({"tag": "nonsense", "include": []})


def test_loads_shipped_weights_small_and_trained_on_training_prompts(sv):
    assert sv.differentiable
    assert sum(f.stat().st_size for f in sv.path.iterdir()) < 3_000_000
    rep = json.loads((sv.path / "training_report.json").read_text())
    assert rep["data_info"] and all(d["split"] == "shapeworld:train" for d in rep["data_info"])
    assert all("training judge v2" in d["judge"] for d in rep["data_info"])
    # the validation rollouts (training prompts, kept out of training): well above the majority class
    base = max(rep["val_strict_base_rate"], 1 - rep["val_strict_base_rate"])
    assert rep["val_strict_accuracy"] > base + 0.1


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(RewardError, match=r"^shapevalue: no model.pt \+ config.json in .*nowhere") as e:
        build_reward("shapevalue", path=tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    with pytest.raises(RewardError, match="has no option"):
        build_reward("shapevalue", temperature=2)
    with pytest.raises(RewardError, match="output must be one of probability, logit"):
        build_reward("shapevalue", output="softmax")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardError, match="^shapevalue: could not load") as e:
        build_rewards({"shapevalue": {"weight": 1.0, "path": str(tmp_path / "broken")}})
    assert "\n" not in str(e.value)


def test_unknown_prompt_without_metadata_is_one_line(sv):
    x = torch.full((1, 3, 32, 32), 0.9)
    with pytest.raises(RewardError, match="no GenEval metadata for prompt 'a photo of a dragon'"):
        sv(x, ["a photo of a dragon"])


def test_differentiable_gradient_reaches_the_image(sv):
    m = make_metadata("colors", shape="circle", color="red")
    x = _img(scene_for(m, random.Random(0))).requires_grad_(True)
    out = sv(x, [m["prompt"]], [m])
    assert out["reward"].requires_grad
    out["reward"].sum().backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # a small step along the gradient raises the reward (the gradient is the reward's, not noise)
    with torch.no_grad():
        r0 = sv(x, [m["prompt"]], [m])["logit"]
        x1 = (x + 1e-3 * g / g.norm()).clamp(0, 1)
        r1 = sv(x1, [m["prompt"]], [m])["logit"]
    assert r1 > r0


def test_preprocessing_and_determinism(sv):
    metas = [make_metadata("single_object", shape=s) for s in ("circle", "square", "triangle", "cross")]
    x = torch.cat([_img(scene_for(m, random.Random(i))) for i, m in enumerate(metas)])
    prompts = [m["prompt"] for m in metas]
    a = sv(x, prompts, metas)
    b = sv(x, prompts, metas)
    assert torch.equal(a["reward"], b["reward"])  # deterministic
    # the prompt's metadata is looked up when not given (ShapeWorld prompts)
    assert torch.equal(sv(x, prompts)["reward"], a["reward"])
    # reward = sigmoid(logit); output="logit" returns the logit
    assert torch.allclose(a["reward"], torch.sigmoid(a["logit"]))
    assert torch.allclose(build_reward("shapevalue", output="logit")(x, prompts, metas)["reward"], a["logit"])
    # a 64 px input is resized exactly as F.interpolate(antialias) would
    big = F.interpolate(x, size=(64, 64), mode="nearest")
    small = F.interpolate(big, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(sv(big, prompts, metas)["reward"], sv(small, prompts, metas)["reward"], atol=1e-6)
    # uint8 arrays give the same scores as the tensor
    u8 = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]
    assert torch.allclose(sv(u8, prompts, metas)["reward"], a["reward"], atol=1e-5)


def _render_pairs(n_per_task: int = 8, seed: int = 0):
    """Renders of test prompts (satisfied by construction) and the same renders under a hard-negative prompt the
    scene does not satisfy."""
    from flowalign.eval.benchmark import resolve_prompts, subsample
    from flowalign.eval.geneval import load_metadata
    from flowalign.shapeworld.shapeclip_train import hard_negatives, satisfies

    metas = subsample(load_metadata(resolve_prompts("shapeworld:test")), n_per_task)
    rng = random.Random(seed)
    rows = []
    for i, m in enumerate(metas):
        objs = scene_for(m, random.Random(seed + i))
        negs = [h for h in hard_negatives(m) if not satisfies(h, objs)]
        rows.append((m, rng.choice(negs) if negs else None, _img(objs)))
    return rows


def test_scores_real_renders_well_above_chance(sv):
    rows = _render_pairs(16)
    x = torch.cat([r[2] for r in rows])
    pos = sv(x, [r[0]["prompt"] for r in rows], [r[0] for r in rows])["reward"]
    keep = [i for i, r in enumerate(rows) if r[1] is not None]
    neg = sv(x[keep], [rows[i][1]["prompt"] for i in keep], [rows[i][1] for i in keep])["reward"]
    # chance is 0.5 for both. Measured on the shipped weights (96 renders): its own prompt above a hard negative in
    # 0.81, hard negatives refused (p <= 0.5) in 0.94. Not asserted because it is poor: on clean renders (never
    # seen in training, only generated images were) it accepts only 0.40 of the satisfied prompts (position and
    # color_attr ~0: it has learned those tasks' low base rate on generated images)
    assert (pos[keep] > neg).float().mean().item() >= 0.75
    assert (neg <= 0.5).float().mean().item() >= 0.85
    assert pos.mean() > neg.mean() + 0.2


def test_reno_through_optimize_raises_shapevalue(tiny_adapter):
    """shapevalue as ReNO's reward inside ``noise.optimize``: its gradient reaches the noise and the reward climbs."""
    from flowalign.noise import optimize
    from flowalign.rewards import build_reward

    torch.set_num_threads(1)
    prompts = ["a photo of a red circle", "a photo of two squares"]
    res = optimize(tiny_adapter, prompts, build_reward("shapevalue", output="logit"), "reno", iterations=6,
                   sampler_steps=2, num_steps=4, guidance=3.0, seed=0, checkpointing=True)
    t = res.trajectory  # (7, 2): the preview reward (logit) of every iterate
    assert t.shape == (7, 2)
    # measured: logits -3.3 -> 4.4 and -10.9 -> 6.2 in six steps; a rise of 2 nats is far outside float noise
    assert (t[-1] - t[0] > 2.0).all(), t
    assert res.info["best_preview_reward"] == pytest.approx(t.max(0).values.tolist())
