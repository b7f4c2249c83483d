"""Reward interface, input checks, registry, JPEG rewards and the combinators (no model weights needed)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.rewards import (Ensemble, Pairwise, Reward, RewardError, RunningStats, WeightedSum, build_reward,
                               build_rewards, known_rewards, to_tensor)
from flowalign.rewards.base import resolve_dtype
from flowalign.rewards.combine import win_rates


class Brightness(Reward):
    """A real (weightless) differentiable reward: mean pixel value, times a factor."""
    name = "brightness"
    differentiable = True

    def __init__(self, factor: float = 1.0, batch_size: int = 64):
        super().__init__(batch_size=batch_size)
        self.factor = factor
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        m = images.mean(dim=(1, 2, 3)) * self.factor
        return {"reward": m, "half": m / 2}


def flat(value: float, n: int = 1, size: int = 16) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


# ------------------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize("images, msg", [
    (torch.rand(2, 4, 8, 8), "must be (B, 3, H, W)"),
    (torch.rand(2, 8, 8), "must be (B, 3, H, W)"),
    (torch.rand(2, 3, 8, 8) * 255, "must lie in [0, 1]"),
    (torch.rand(2, 3, 8, 8) - 0.5, "must lie in [0, 1]"),
    (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "float"),
    ([np.zeros((8, 8, 3), np.float32)], "uint8"),
    ([np.zeros((8, 8), np.uint8)], "HxWx3"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "same size"),
    ([], "empty image batch"),
    ("not images", "tensor or a list"),
])
def test_bad_images_raise_one_line(images, msg):
    with pytest.raises(RewardError) as e:
        Brightness()(images, ["p"] * 2)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prompts, meta, msg", [
    ([], None, "empty prompt list"),
    (["a"], None, "2 images but 1 prompts"),
    ("a b", None, "not a single string"),
    (["a", "b"], [{}], "2 images but 1 metadata"),
])
def test_bad_batches_raise_one_line(prompts, meta, msg):
    with pytest.raises(RewardError) as e:
        Brightness()(torch.rand(2, 3, 8, 8), prompts, meta)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_nan_images_give_nan_rewards_for_the_trainer_to_skip():
    x = torch.rand(2, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    r = Brightness()(x, ["a", "b"])["reward"]
    assert torch.isfinite(r[0]) and torch.isnan(r[1])


def test_pil_uint8_and_tensor_inputs_agree():
    arr = (np.arange(8 * 8 * 3) % 256).astype(np.uint8).reshape(8, 8, 3)
    r = Brightness()
    a = r([Image.fromarray(arr)], ["p"])["reward"]
    b = r([arr], ["p"])["reward"]
    c = r(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, ["p"])["reward"]
    assert torch.allclose(a, b) and torch.allclose(b, c)
    assert torch.allclose(a, torch.tensor([arr.mean() / 255.0], dtype=torch.float32))


def test_batching_concatenates_chunks():
    r = Brightness(batch_size=2)
    x = torch.rand(5, 3, 8, 8)
    out = r(x, ["p"] * 5)
    assert r.calls == 3
    assert torch.allclose(out["reward"], x.mean(dim=(1, 2, 3))) and out["half"].shape == (5,)


def test_graph_only_when_gradients_can_flow():
    r = Brightness()
    x = torch.rand(2, 3, 8, 8)
    assert r(x, ["a", "b"])["reward"].grad_fn is None  # plain input: no graph
    xg = x.clone().requires_grad_(True)
    r(xg, ["a", "b"])["reward"].sum().backward()
    assert torch.allclose(xg.grad, torch.full_like(x, 1 / (3 * 8 * 8)))
    with torch.no_grad():
        assert r(xg, ["a", "b"])["reward"].grad_fn is None
    assert r(xg, ["a", "b"], grad=False)["reward"].grad_fn is None


def test_dtype_spellings():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(RewardError, match="unknown dtype"):
        resolve_dtype("float8")


def test_registry_lists_the_zoo():
    names = known_rewards()
    for n in ("clipscore", "pickscore", "hpsv2", "imagereward", "aesthetic", "geneval", "ocr",
              "jpeg_compressibility", "jpeg_incompressibility", "shapeworld"):
        assert n in names
    with pytest.raises(RewardError, match="unknown reward 'nope'; known rewards: aesthetic, artifact, bradley_terry, clipscore"):
        build_reward("nope")
    with pytest.raises(RewardError, match="has no option"):
        build_reward("jpeg_compressibility", colour="red")


# -------------------------------------------------------------------------------------------------- JPEG
def jpeg_kb(arr: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000


def test_jpeg_rewards_match_hand_computed_sizes_and_rank_noise_below_flat():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat_img = np.full((64, 64, 3), 128, np.uint8)
    comp, incomp = build_reward("jpeg_compressibility"), build_reward("jpeg_incompressibility")
    c = comp([noise, flat_img], ["a", "b"])
    i = incomp([noise, flat_img], ["a", "b"])
    kb = torch.tensor([jpeg_kb(noise), jpeg_kb(flat_img)])
    assert torch.allclose(c["size_kb"], kb) and torch.allclose(c["reward"], -kb / 500)
    assert torch.allclose(i["reward"], kb / 500)
    assert c["reward"][0] < c["reward"][1]  # noise is less compressible than a flat image
    assert i["reward"][0] > i["reward"][1]
    assert not comp.differentiable and comp.name == "jpeg_compressibility"


# ------------------------------------------------------------------------------------------ combinators
def test_running_stats_welford_matches_numpy_and_ema_mixes_moments():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(3, 2, n) for n in (1, 5, 17, 2)]
    s = RunningStats()
    assert s.std == 1.0 and s.mean == 0.0
    for c in chunks:
        s.update(torch.tensor(c))
    allv = np.concatenate(chunks)
    assert s.count == len(allv) and math.isclose(s.mean, allv.mean(), rel_tol=1e-9)
    assert math.isclose(s.std, allv.std(ddof=1), rel_tol=1e-9)
    e = RunningStats(momentum=0.5)
    e.update(torch.tensor([0.0, 2.0]))  # mean 1, var 1
    e.update(torch.tensor([4.0, 4.0]))  # batch mean 4, var 0 -> mean 2.5, var 0.5*(1 + 0.5*9) + 0 = 2.75
    assert math.isclose(e.mean, 2.5) and math.isclose(e.var, 2.75)
    t = RunningStats()
    t.load_state_dict(s.state_dict())
    assert (t.count, t.mean, t.m2) == (s.count, s.mean, s.m2)


def test_weighted_sum_values_components_and_gradients():
    a, b = Brightness(1.0), Brightness(-2.0)
    ws = WeightedSum({"a": a, "b": b}, {"a": 0.5, "b": 2.0})
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    out = ws(x, ["p"] * 3)
    m = x.detach().mean(dim=(1, 2, 3))
    assert torch.allclose(out["a"], m) and torch.allclose(out["b"], -2 * m)
    assert torch.allclose(out["a/half"], m / 2)
    assert torch.allclose(out["reward"], 0.5 * m + 2.0 * (-2 * m))
    assert ws.differentiable
    out["reward"].sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, (0.5 - 4.0) / (3 * 8 * 8)))


def test_weighted_sum_normalisation_uses_stats_updated_first():
    ws = WeightedSum({"a": Brightness(1.0), "b": Brightness(10.0)}, {"a": 1.0, "b": 1.0}, normalize=True)
    x1 = torch.stack([flat(v)[0] for v in (0.1, 0.3, 0.5)])
    out = ws(x1, ["p"] * 3)
    v = np.array([0.1, 0.3, 0.5])
    z = (v - v.mean()) / v.std(ddof=1)
    assert np.allclose(out["a/normalized"].numpy(), z, atol=1e-5)
    assert np.allclose(out["b/normalized"].numpy(), z, atol=1e-5)  # scale-free: both components weigh alike
    assert np.allclose(out["reward"].numpy(), 2 * z, atol=1e-5)
    out2 = ws(flat(0.9), ["p"])
    allv = np.array([0.1, 0.3, 0.5, 0.9])
    assert np.allclose(out2["a/normalized"].numpy(), (0.9 - allv.mean()) / allv.std(ddof=1), atol=1e-5)
    assert ws.state_dict()["a"]["count"] == 4


def test_ensemble_is_the_mean():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardError, match="share names"):  # both are named "brightness"
        Ensemble([Brightness(1.0), Brightness(3.0)])
    out = Ensemble({"x1": Brightness(1.0), "x3": Brightness(3.0)})(x, ["a", "b"])
    assert torch.allclose(out["reward"], 2 * x.mean(dim=(1, 2, 3)))
    assert set(out) >= {"x1", "x3", "reward"}


def test_win_rates_by_hand():
    s = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 7.0, 0.0])
    g = ["a", "a", "a", "a", "b", "b", "c"]
    # group a: 1 beats none (0/3); 3 beats all (3/3); each 2 beats 1, ties the other 2 -> (1 + .5)/3
    expect = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0, 1.0, 0.5])
    assert torch.allclose(win_rates(s, g), expect)
    assert torch.allclose(win_rates(torch.tensor([1.0, 1.05]), ["a", "a"], tie_eps=0.1), torch.tensor([0.5, 0.5]))


def test_pairwise_groups_by_prompt_or_metadata_key():
    x = torch.stack([flat(v)[0] for v in (0.2, 0.8, 0.5, 0.1, 0.9)])
    pw = Pairwise(Brightness())
    out = pw(x, ["p", "p", "p", "q", "q"])
    assert torch.allclose(out["reward"], torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0]))
    assert torch.allclose(out["brightness"], torch.tensor([0.2, 0.8, 0.5, 0.1, 0.9]))
    assert not pw.differentiable and pw.name == "pairwise_brightness"
    meta = [{"g": 0}, {"g": 1}, {"g": 0}, {"g": 1}, {"g": 0}]
    out = Pairwise(Brightness(), group_key="g")(x, ["p"] * 5, meta)
    # group 0: 0.2, 0.5, 0.9 ; group 1: 0.8, 0.1
    assert torch.allclose(out["reward"], torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0]))
    with pytest.raises(RewardError, match="no 'g' key"):
        Pairwise(Brightness(), group_key="g")(x, ["p"] * 5, [{}] * 5)


def test_build_rewards_syntax():
    single = build_rewards({"jpeg_compressibility": 1.0})
    assert type(single).__name__ == "JpegReward"  # no wrapper for one reward with weight 1
    assert type(build_rewards("jpeg_compressibility")).__name__ == "JpegReward"
    combo = build_rewards({"jpeg_compressibility": 1.0, "inc": {"reward": "jpeg_incompressibility", "weight": 0.5,
                                                                "quality": 50}})
    assert isinstance(combo, WeightedSum) and combo.weights == {"jpeg_compressibility": 1.0, "inc": 0.5}
    assert combo.rewards["inc"].quality == 50
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = combo([img], ["p"])
    assert set(out) == {"reward", "jpeg_compressibility", "jpeg_compressibility/size_kb", "inc", "inc/size_kb"}
    assert torch.allclose(out["reward"], out["jpeg_compressibility"] + 0.5 * out["inc"])
    weighted = build_rewards({"jpeg_incompressibility": 2.0})
    assert isinstance(weighted, WeightedSum)
    pw = build_rewards({"jpeg_incompressibility": {"pairwise": True, "tie_eps": 0.0}})
    assert isinstance(pw, Pairwise)
    both = build_rewards(["jpeg_compressibility", "jpeg_incompressibility"], device="meta")
    assert isinstance(both, WeightedSum) and all(r.device.type == "meta" for r in both.rewards.values())


@pytest.mark.parametrize("spec, msg", [
    ({"pickscore": 1.0, "artifactz": 0.5}, "unknown reward 'artifactz'; known rewards: aesthetic,"),
    ({"jpeg_compressibility": "heavy"}, "reward 'jpeg_compressibility': weight must be a finite number, got 'heavy'"),
    ({"jpeg_compressibility": {"weight": float("inf")}}, "weight must be a finite number, got inf"),
    ({"jpeg_compressibility": True}, "weight must be a finite number, got True"),
    ({"jpeg_compressibility": {"quallity": 3}}, "has no option(s) 'quallity'"),
    ({"jpeg_compressibility": {"tie_eps": 0.1}}, "only apply with pairwise"),
    ({}, "empty reward spec"),
    (42, "must be a name, a list of names or a mapping"),
])
def test_build_rewards_errors_are_one_line(spec, msg):
    with pytest.raises(RewardError) as e:
        build_rewards(spec)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_build_rewards_validates_before_loading_models():
    # pickscore would try to load weights; the unknown name must fail first
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        build_rewards({"pickscore": {"path": "/definitely/not/here"}, "nope": 1.0})
    with pytest.raises(RewardError, match="weight directory not found: /definitely/not/here"):
        build_rewards({"pickscore": {"path": "/definitely/not/here"}})


def test_to_tensor_roundtrip():
    arr = np.random.default_rng(2).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = to_tensor(arr)
    assert x.shape == (2, 3, 5, 6) and torch.allclose(x * 255, torch.from_numpy(arr).permute(0, 3, 1, 2).float())
