"""shapeclip: the ShapeWorld CLIP proxy reward (training loop, save/load through the real loader, gradients,
errors) and the reward-hacking configs. Training here is a few steps of a tinier model; the shipped weights'
held-out retrieval accuracy is checked only when they are present."""
import json
import random

import numpy as np
import pytest
import torch

from flowalign.config import load_config
from flowalign.rewards import RewardError, build_reward, build_rewards, known_rewards
from flowalign.rewards.shapeclip import DEFAULT_PATH, ShapeClipReward
from flowalign.shapeworld import shapeclip_train as S
from flowalign.shapeworld.detector import detect
from flowalign.eval.geneval import judge
from flowalign.shapeworld.world import random_scene, render, render_batch

TINY = S.ShapeClipRecipe(seed=0, steps=12, batch=16, hidden=32, vision_layers=1, text_layers=1, heads=2,
                         projection_dim=32, warmup=2, lr=3e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shapeclip")
    rep = S.train(out, TINY, progress=False, evaluate=False)
    return out, rep


def _batch(n=6, seed=3):
    imgs, metas = render_batch(n, seed=seed)
    return imgs, [m["prompt"] for m in metas]


def test_training_lowers_the_loss_and_writes_a_report(tiny):
    out, rep = tiny
    assert rep["fixed_batch_loss_after"] < rep["fixed_batch_loss_before"]
    assert len(rep["losses"]) == TINY.steps and all(np.isfinite(rep["losses"]))
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["recipe"]["steps"] == TINY.steps and "losses" not in saved
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out / f).is_file(), f


def test_training_is_deterministic(tiny, tmp_path):
    _, rep = tiny
    # a shorter run with the same seed: the same data and initialisation, so the same first two losses (the
    # learning-rate schedule depends on the step count from the second update on)
    rep2 = S.train(tmp_path, S.ShapeClipRecipe(**{**TINY.__dict__, "steps": 2}), progress=False, evaluate=False)
    assert rep2["losses"] == rep["losses"][:2]


def test_save_load_round_trip_is_exact(tiny):
    from transformers import CLIPModel, CLIPTokenizer

    out, rep = tiny
    model = rep["model"]
    loaded = CLIPModel.from_pretrained(str(out))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tok = CLIPTokenizer.from_pretrained(str(out))
    assert all(len(tok(w).input_ids) == 3 for w in ("circle", "crosses", "purple", "left"))  # one token per word
    imgs, prompts = _batch()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = (S.image_embeds(model, x) * S.text_embeds(model, tok, prompts)).sum(-1)
    got = build_reward("shapeclip", path=str(out))(x, prompts)
    torch.testing.assert_close(got["cosine"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["reward"], want * model.logit_scale.exp().detach(), rtol=1e-5, atol=1e-5)
    # lists of uint8 images score the same as the [0, 1] tensor
    torch.testing.assert_close(build_reward("shapeclip", path=str(out))(list(imgs), prompts)["reward"], got["reward"])


def test_reward_is_differentiable_and_resizes(tiny):
    out, _ = tiny
    r = build_reward("shapeclip", path=str(out))
    assert r.differentiable and r.size == 32 and "shapeclip" in known_rewards()
    imgs, prompts = _batch(4)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255)
    big = torch.nn.functional.interpolate(x, size=64, mode="nearest").requires_grad_(True)
    res = r(big, prompts)
    res["reward"].sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0 and torch.isfinite(big.grad).all()
    assert res["cosine"].abs().max() <= 1 + 1e-5
    assert not build_reward("shapeclip", path=str(out), scaled=False)(x, prompts)["reward"].requires_grad
    # a combination with the config syntax
    w = build_rewards({"shapeclip": {"weight": 1.0, "path": str(out)}})
    torch.testing.assert_close(w(x, prompts)["reward"], r(x, prompts)["reward"])


def test_missing_or_bad_weights_are_one_line_errors(tmp_path):
    with pytest.raises(RewardError, match="weight directory not found: .*nowhere") as e:
        ShapeClipReward(path=tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="no config.json in .*empty"):
        build_reward("shapeclip", path=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(RewardError, match="could not load a CLIPModel from .*bad") as e:
        build_reward("shapeclip", path=str(tmp_path / "bad"))
    assert "\n" not in str(e.value)


def test_bad_inputs(tiny):
    out, _ = tiny
    r = build_reward("shapeclip", path=str(out))
    with pytest.raises(RewardError, match="batch mismatch"):
        r(torch.rand(2, 3, 32, 32), ["a photo of a circle"])
    with pytest.raises(RewardError, match=r"\(B, 3, H, W\)"):
        r(torch.rand(2, 1, 32, 32), ["a", "b"])
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        r(torch.rand(1, 3, 32, 32) * 2, ["a photo of a circle"])
    with pytest.raises(RewardError, match="no option"):
        build_reward("shapeclip", path=str(out), temperature=2)


def test_ground_truth_and_hard_negatives_agree_with_the_judge():
    rng = random.Random(0)
    agree, n = 0, 0
    for _ in range(80):
        meta, objs = random_scene(rng)
        dets = detect(np.asarray(render(objs)))
        assert S.satisfies(meta, objs)
        for h in S.hard_negatives(meta):
            assert h["prompt"] != meta["prompt"] and h["tag"] == meta["tag"]
            assert not S.satisfies(h, objs), (meta["prompt"], h["prompt"])
            agree += S.satisfies(h, objs) == judge(h, dets)[0]
            n += 1
    assert agree / n >= 0.98


def test_retrieval_accuracy_report_shape(tiny):
    from transformers import CLIPTokenizer

    out, rep = tiny
    acc = S.retrieval_accuracy(rep["model"], CLIPTokenizer.from_pretrained(str(out)), n_per_task=1)
    assert set(acc) == {"test", "test_unseen"}
    assert set(acc["test"]["top1"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert set(acc["test_unseen"]["top1"]) == {"position", "color_attr"}
    assert all(0 <= v <= 1 for s in acc.values() for v in s["top1"].values())


def test_training_uses_only_seen_prompts():
    _, unseen = S.split()
    stream = S.SceneCaptionStream(0)
    unseen_prompts = {m["prompt"] for v in unseen.values() for m in v}
    assert not unseen_prompts & {m["prompt"] for m in stream.captions}


@pytest.mark.skipif(not (DEFAULT_PATH / "model.safetensors").is_file(),
                    reason=f"shipped shapeclip weights not trained yet ({DEFAULT_PATH}); run "
                           "python -m flowalign.shapeworld.shapeclip_train --out rewards/assets/shapeclip")
def test_shipped_weights_prefer_true_prompts_to_hard_negatives():
    rep = json.loads((DEFAULT_PATH / "training_report.json").read_text())
    assert rep["retrieval"]["test"]["top1_overall"] >= 0.6
    r = build_reward("shapeclip")
    rng = random.Random(4242)
    wins = []
    for _ in range(30):
        meta, objs = random_scene(rng)
        negs = [h["prompt"] for h in S.hard_negatives(meta)][:3]
        im = np.asarray(render(objs))
        s = r([im] * (1 + len(negs)), [meta["prompt"]] + negs)["reward"]
        wins += (s[1:] < s[0]).tolist()
    assert np.mean(wins) >= 0.7
    assert sum(f.stat().st_size for f in DEFAULT_PATH.iterdir()) < 3e6


@pytest.mark.parametrize("name,rewards", [("shapeworld_hack_shapeclip", {"shapeclip": 1.0}),
                                          ("shapeworld_hack_shapeclip_artifact", {"shapeclip": 1.0, "artifact": 0.5})])
def test_hacking_configs_load(name, rewards):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / f"{name}.yaml")
    assert cfg.rewards == rewards
    assert cfg.eval.judge == "shapeworld"
    assert cfg.run.output_dir == "runs/" + name.replace("shapeworld_", "")
    other = load_config(root / "configs" / "shapeworld_hack_shapeclip.yaml")
    # the same training budget in both: everything but the rewards and the output directory
    a, b = cfg.to_dict(), other.to_dict()
    for d in (a, b):
        d.pop("rewards")
        d["run"].pop("output_dir")
    assert a == b


def test_hacking_report_script_runs_on_a_tiny_model(tiny, tiny_sd3, tmp_path):
    """base + a full fine-tune run + a LoRA run through benchmarks/hacking_report.py (2 prompts per task)."""
    import importlib.util
    from pathlib import Path

    from flowalign.pipelines.base import load_adapter

    load_adapter(tiny_sd3).save_trained(tmp_path / "runs" / "full" / "final")
    ad = load_adapter(tiny_sd3)
    ad.add_lora(rank=2, alpha=4)
    ad.save_trained(tmp_path / "runs" / "lora" / "final")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hacking_report.py"
    spec = importlib.util.spec_from_file_location("hacking_report", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "report"
    rep = mod.main([str(tmp_path / "runs" / "full"), str(tmp_path / "runs" / "lora"), "--model", tiny_sd3,
                    "--n-per-task", "1", "--steps", "2", "--shapeclip", str(tiny[0]), "--artifact", "none",
                    "--out", str(out), "--threads", "1"])
    assert list(rep["rows"]) == ["base", "full", "lora"]
    for row in rep["rows"].values():
        assert 0 <= row["judge_overall"] <= 1 and 0 <= row["artifact_rate"] <= 1 and np.isfinite(row["proxy_mean"])
        assert row["n_images"] == 6
    # zero-initialised LoRA and an unchanged transformer reproduce the base images exactly
    assert rep["rows"]["full"]["proxy_mean"] == rep["rows"]["base"]["proxy_mean"] == rep["rows"]["lora"]["proxy_mean"]
    assert (out / "hacking_report.png").stat().st_size > 0
    assert "artifact rate" in (out / "hacking_report.md").read_text()
    with pytest.raises(FileNotFoundError, match="no trained weights in .*missing"):
        mod.load_run(tiny_sd3, tmp_path / "runs" / "missing")
