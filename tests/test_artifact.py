"""artifact: the programmatic corruptions (pure, detectable by the independent artifact_stats), the artifact
rate thresholds, and the learned artifact reward (training, save/load, gradients, errors; the shipped weights'
ranking of clean above corrupted images when they are present)."""
import json

import numpy as np
import pytest
import torch

from flowalign.rewards import RewardError, build_reward, known_rewards
from flowalign.rewards.artifact import DEFAULT_PATH, ArtifactNet, ArtifactReward
from flowalign.shapeworld import artifact_train as T
from flowalign.shapeworld.artifacts import (ARTIFACT_THRESHOLDS, CORRUPTIONS, artifact_rate, corrupt,
                                            is_artifact)
from flowalign.shapeworld.detector import artifact_stats
from flowalign.shapeworld.world import render_batch

TINY = T.ArtifactRecipe(seed=0, n_train=256, steps=60, batch=64, widths=(8, 16, 16), hidden=16, n_eval=0)


@pytest.fixture(scope="module")
def renders():
    return render_batch(24, seed=11)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("artifact")
    return out, T.train(out, TINY, progress=False, evaluate_after=False)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruptions_are_pure_functions_that_change_the_image(kind, renders):
    im = renders[0]
    before = im.copy()
    a = CORRUPTIONS[kind](im, np.random.default_rng(5))
    b = CORRUPTIONS[kind](im, np.random.default_rng(5))
    c = CORRUPTIONS[kind](im, np.random.default_rng(6))
    assert np.array_equal(im, before)  # input untouched
    assert a.shape == im.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # a function of (image, rng) only
    for s in (0.0, 1.0):
        assert np.abs(CORRUPTIONS[kind](im, np.random.default_rng(1), s).astype(int) - im).mean() > 1.0


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_flagged_by_artifact_stats_far_more_than_clean(kind, renders):
    clean = artifact_rate(renders)
    rng = np.random.default_rng(3)
    corrupted = artifact_rate([CORRUPTIONS[kind](im, rng) for im in renders])
    assert clean == 0.0
    assert corrupted >= 0.5, (kind, corrupted)


def test_artifact_thresholds_and_bad_inputs(renders):
    s = artifact_stats(renders[0])
    assert not is_artifact(s)
    assert is_artifact(dict(s, speckle=3.0)) and is_artifact(dict(s, off_palette=0.5))
    assert not is_artifact(dict(s, speckle=2.0)) and is_artifact(dict(s, unexplained=0.2))
    assert is_artifact(s, {"off_palette": -1.0})
    assert set(ARTIFACT_THRESHOLDS) == {"off_palette", "unexplained", "speckle"}
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(renders[0].astype(np.float32) / 255, rng)
    with pytest.raises(ValueError, match="HxWx3"):
        corrupt(renders[0][..., 0], rng)
    with pytest.raises(ValueError, match="unknown corruption 'blur'; known: hf_noise"):
        corrupt(renders[0], rng, "blur")
    with pytest.raises(ValueError, match="strength"):
        corrupt(renders[0], rng, "smear", strength=2.0)
    with pytest.raises(ValueError, match="at least one"):
        artifact_rate([])
    assert corrupt(renders[0], np.random.default_rng(0))[1] in CORRUPTIONS


def test_training_data_is_balanced_and_labelled():
    x, y, kinds = T.make_images(20, seed=1, p_double=0.0)
    assert x.shape == (20, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [i % 2 for i in range(20)]
    assert all((k == "clean") == (lab == 0) for k, lab in zip(kinds, y.tolist()))
    assert all(k == "clean" or k in CORRUPTIONS for k in kinds)


def test_training_lowers_the_loss_and_round_trips_exactly(tiny):
    out, rep = tiny
    assert rep["train_loss"] < rep["first_loss"]
    assert json.loads((out / "training_report.json").read_text())["recipe"]["steps"] == TINY.steps
    net = rep["model"]
    loaded = ArtifactNet.from_pretrained(out)
    sd, sd2 = net.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    # the random features are frozen and reproducible from the seed; only the head is trained
    fresh = ArtifactNet(widths=TINY.widths, hidden=TINY.hidden, feature_seed=TINY.feature_seed)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(fresh.features, loaded.features))
    assert not any(p.requires_grad for p in fresh.features.parameters())


def test_reward_is_log_p_clean_and_differentiable(tiny, renders):
    out, rep = tiny
    r = build_reward("artifact", path=str(out))
    assert "artifact" in known_rewards() and r.differentiable
    x = (torch.from_numpy(renders[:4]).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    res = r(x, ["a photo of a circle"] * 4)
    assert (res["reward"] <= 0).all()
    torch.testing.assert_close(res["reward"].exp(), 1 - res["p_artifact"], rtol=1e-4, atol=1e-6)
    res["reward"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    big = torch.nn.functional.interpolate(x.detach(), size=64, mode="nearest")
    assert r(big, ["x"] * 4)["reward"].shape == (4,)
    with pytest.raises(RewardError, match="batch mismatch"):
        r(x.detach(), ["only one prompt"])


def test_missing_or_bad_weights_are_one_line_errors(tmp_path):
    with pytest.raises(RewardError, match="weight directory not found: .*nowhere") as e:
        ArtifactReward(path=tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(RewardError, match="no model.safetensors in .*cfg_only"):
        build_reward("artifact", path=str(tmp_path / "cfg_only"))
    d = ArtifactNet(widths=(4, 4, 4), hidden=4).save_pretrained(tmp_path / "wrong")
    (d / "config.json").write_text(json.dumps({"widths": [8, 8, 8], "hidden": 4}))
    with pytest.raises(RewardError, match="could not load ArtifactNet from .*wrong") as e:
        build_reward("artifact", path=str(d))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not (DEFAULT_PATH / "model.safetensors").is_file(),
                    reason=f"shipped artifact weights not trained yet ({DEFAULT_PATH}); run "
                           "python -m flowalign.shapeworld.artifact_train --out rewards/assets/artifact")
def test_shipped_weights_rank_clean_above_corrupted():
    r = build_reward("artifact")
    x, y, kinds = T.make_images(120, seed=31337, p_double=0.0)  # fresh samples, not the training seeds
    s = r(x, ["x"] * len(x))["reward"].numpy()  # log p(clean)
    clean, bad = s[y.numpy() == 0], s[y.numpy() == 1]
    assert T.auc(clean, bad) >= 0.9
    for k in CORRUPTIONS:
        sel = np.array([kk == k for kk in kinds])
        assert T.auc(clean, s[sel]) >= 0.75, k
    assert sum(f.stat().st_size for f in DEFAULT_PATH.iterdir()) < 3e6
