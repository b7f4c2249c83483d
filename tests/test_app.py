"""The demo's callbacks as plain functions (``flowalign.app.core``) on the shipped ShapeWorld model, few steps: run
scanning (LoRA and full ``final/``), cached loading, the compare tab's images and score table against the public API
computed directly, one-line messages for an empty prompt / bad checkpoint / unknown reward, a streamed noise job
and its stop button, the runs tab, and ``noise.optimize``'s callback hook (it changes no number; True stops)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign import noise
from flowalign.app import core
from flowalign.app.core import DemoError

PROMPT = "a photo of a red circle"  # a test-split record (colors)
STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _base_adapter():
    from flowalign.pipelines.base import load_adapter
    from flowalign.trainer import resolve_model_path

    return load_adapter(resolve_model_path("shapeworld"))


def make_runs(root, full: bool = True, bad: bool = True):
    """A runs folder: ``lora_run`` (LoRA weights, B matrices perturbed so they change the images), ``full_run``
    (a perturbed full transformer) and ``bad_run`` (a final/ whose .safetensors is garbage), each with the files
    the trainer writes that the runs tab reads."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    a = _base_adapter()
    a.add_lora(rank=4, alpha=4)
    with torch.no_grad():
        for n, p in a.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    a.save_trained(root / "lora_run" / "final")
    runs = {"lora_run": True}
    if full:
        b = _base_adapter()
        b.full_finetune()
        with torch.no_grad():
            for p in b.transformer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        b.save_trained(root / "full_run" / "final")
        runs["full_run"] = False
    for name, lora in runs.items():
        d = root / name
        (d / "config.json").write_text(json.dumps({"model": {"path": "shapeworld", "lora": {"enabled": lora}},
                                                   "algorithm": {"name": "nft"}}))
        (d / "report.md").write_text(f"### {name}\n\n| task | base | trained |\n|---|---|---|\n"
                                     "| overall | 0.5 | 0.6 |\n")
        Image.new("RGB", (60, 40), (10, 120, 200)).save(d / "reward_curve.png")
        (d / "samples").mkdir()
        Image.new("RGB", (40, 40), (200, 20, 20)).save(d / "samples" / "final.png")
    if bad:
        (root / "bad_run" / "final").mkdir(parents=True)
        (root / "bad_run" / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    (root / "plots_only").mkdir()
    Image.new("RGB", (30, 30)).save(root / "plots_only" / "reward_curve.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def demo(runs):
    return core.Demo(runs)


# ------------------------------------------------------------------------------------------------ runs and models
def test_scan_finds_lora_and_full_runs_with_their_kind(runs, demo):
    found = {c.label: c for c in core.scan_runs(runs)}
    assert set(found) == {"lora_run (lora)", "full_run (full)", "bad_run (lora)"}
    assert found["full_run (full)"].weights == str(runs / "full_run" / "final")
    assert found["lora_run (lora)"].base == "shapeworld"
    labels = demo.model_labels()
    assert labels[0] == "base (shapeworld)" and len(labels) == 4
    # preselected: the base and the most recently trained run (main_s0 when there is one)
    assert demo.default_models() == ["base (shapeworld)", "bad_run (lora)"]
    assert core.scan_runs(runs / "does_not_exist") == []


def test_rescan_finds_a_run_that_finished_after_start_up(tmp_path, runs):
    import shutil

    d = core.Demo(tmp_path)
    assert d.model_labels() == ["base (shapeworld)"] and d.default_models() == ["base (shapeworld)"]
    shutil.copytree(runs / "lora_run", tmp_path / "lora_run")
    labels, keep, run_names, msg = d.rescan(["base (shapeworld)"])
    assert labels == keep == ["base (shapeworld)", "lora_run (lora)"] and run_names == ["lora_run"]
    assert msg.startswith("found 1 trained run")
    assert d.rescan(["lora_run (lora)", "gone (full)"])[1] == ["lora_run (lora)", "base (shapeworld)"]


def test_paths_typed_by_the_user_resolve_or_give_a_message(runs):
    assert core.choice_from_path(str(runs / "lora_run")).weights == str(runs / "lora_run" / "final")
    assert core.Demo(runs).resolve(["lora_run", "full_run (full)"])[0].label == "lora_run (lora)"
    assert core.choice_from_path(str(runs / "full_run" / "final")).kind == "full"
    with pytest.raises(DemoError, match="no such directory"):
        core.choice_from_path(str(runs / "nope"))
    with pytest.raises(DemoError, match="no trained weights here"):
        core.choice_from_path(str(runs / "plots_only"))


# ------------------------------------------------------------------------------------------------ compare
def test_compare_images_are_the_benchmarks_and_trained_weights_change_them(demo):
    from flowalign.eval.benchmark import generate

    res = demo.compare(PROMPT, 3, ["base (shapeworld)", "lora_run (lora)", "full_run (full)"], steps=STEPS)
    assert [c for _, c in res.images] == ["base (shapeworld)", "lora_run (lora)", "full_run (full)"]
    assert res.raw.shape == (3, 32, 32, 3) and res.images[0][0].size == (core.DISPLAY_SIDE, core.DISPLAY_SIDE)
    # seed s is the benchmark's image of record s (same noise, same sampler)
    ref = generate(_base_adapter(), [PROMPT], STEPS, 2.0, 3)[0]
    assert np.array_equal(res.raw[0], ref)
    assert not np.array_equal(res.raw[0], res.raw[1]), "the LoRA weights were not applied"
    assert not np.array_equal(res.raw[0], res.raw[2]), "the full weights were not applied"
    assert "task **colors**" in res.message
    # cached: the same call loads nothing and gives the same images
    loads = demo.cache.loads
    again = demo.compare(PROMPT, 3, ["base (shapeworld)", "lora_run (lora)", "full_run (full)"], steps=STEPS)
    assert demo.cache.loads == loads and np.array_equal(again.raw, res.raw)


def test_score_table_matches_the_judges_and_rewards_called_directly(demo):
    from flowalign.eval.judges import verdicts
    from flowalign.rewards import build_reward
    from flowalign.shapeworld.detector import detect

    res = demo.compare(PROMPT, 0, ["base (shapeworld)", "lora_run (lora)"], steps=STEPS)
    assert res.headers == ["score", "base (shapeworld)", "lora_run (lora)"]
    rows = {r[0]: r[1:] for r in res.rows}
    record = core.record_for(PROMPT)
    x = torch.from_numpy(res.raw).permute(0, 3, 1, 2).float() / 255
    for i, img in enumerate(res.raw):
        v = verdicts(record, img)
        ok, partial = v["heldout_strict"]
        assert rows["verdict: held-out strict (headline)"][i] == \
            ("✓ correct" if ok else "✗ wrong") + f" (partial {partial:.2f})"
        assert rows["detected (training judge)"][i] == core.describe_detections(detect(img))
    shapeclip = build_reward("shapeclip")(x, [PROMPT] * 2)["reward"]
    assert rows["shapeclip"] == [f"{float(s):.3f}" for s in shapeclip]
    kb = build_reward("jpeg_compressibility")(x, [PROMPT] * 2)["size_kb"]
    assert rows["jpeg_compressibility: size_kb"] == [f"{float(s):.3f}" for s in kb]
    sw = build_reward("shapeworld")(x, [PROMPT] * 2, [record] * 2)["reward"]
    assert rows["shapeworld"] == [f"{float(s):.3f}" for s in sw]
    # rewards whose weights are not on this machine are listed, not fatal
    assert "clipscore" in demo.bank.unavailable and "clipscore" not in rows


def test_free_text_prompt_is_scored_but_not_judged(demo):
    res = demo.compare("a photo of a blue dragon", 0, ["base (shapeworld)"], steps=STEPS)
    rows = {r[0]: r[1:] for r in res.rows}
    assert rows["verdict"] == ["– (free text: no benchmark record to judge)"]
    assert "shapeworld (needs a benchmark record)" in rows and "shapeclip" in rows
    assert "free text" in res.message


@pytest.mark.parametrize("call, message", [
    (lambda d: d.compare("   ", 0, ["base (shapeworld)"]), "the prompt is empty"),
    (lambda d: d.compare(PROMPT, 0, ["base (shapeworld)", "bad_run (lora)"], steps=STEPS),
     "could not load the trained weights of bad_run"),
    (lambda d: d.compare(PROMPT, 0, [], extra_path="/no/such/run"), "no such directory: /no/such/run"),
    (lambda d: d.compare(PROMPT, -1, ["base (shapeworld)"]), "seed must be a whole number"),
    (lambda d: d.start_noise("k", PROMPT, "base (shapeworld)", "reno", "nosuchreward", 100),
     "unknown reward 'nosuchreward'"),
    (lambda d: d.start_noise("k", PROMPT, "base (shapeworld)", "reno", "shapeworld", 100),
     "'shapeworld' is not differentiable"),
    (lambda d: d.start_noise("k", PROMPT, "base (shapeworld)", "annealing", "shapeclip", 100), "unknown method"),
    (lambda d: d.start_noise("k", "", "base (shapeworld)", "reno", "shapeclip", 100), "the prompt is empty"),
    (lambda d: d.start_noise("k", "a photo of a blue dragon", None, "fk", "shapeworld", 100),
     "needs a benchmark record"),
    (lambda d: core.run_view(d.runs_dir, "no_such_run"), "no such run directory"),
])
def test_bad_input_is_a_one_line_message(demo, call, message):
    out, err = core.guard(call, demo)
    assert out is None and message in err and "\n" not in err


def test_unexpected_errors_become_a_line_too():
    def boom():
        raise KeyError("x")

    assert core.guard(boom) == (None, "internal error (KeyError): 'x'")


# ------------------------------------------------------------------------------------------------ noise tab
def test_noise_job_streams_every_iteration_and_ends_with_the_result(demo):
    job = demo.start_noise("s1", PROMPT, "base (shapeworld)", "reno", "shapeclip=1", 200, seed=1, steps=STEPS)
    events = list(job.updates(timeout=120))
    job.join(10)
    assert job.error is None and not job.running
    r = job.result
    # one event per ReNO iterate, in order, carrying the trajectory's values
    assert [e.step for e in events] == list(range(r.trajectory.shape[0]))
    assert [e.reward for e in events] == pytest.approx(r.trajectory[:, 0].tolist())
    assert all(e.image.shape == (32, 32, 3) and e.image.dtype == np.uint8 for e in events)
    assert events[-1].nfe <= r.nfe <= 200 and not r.info["stopped_early"]
    assert "done" in job.status() and "NFE" in job.status()
    headers, rows = job.final_table()
    assert headers[1:] == ["base sample (same seed)", "after ReNO"]
    from flowalign.rewards import build_reward

    shown = torch.from_numpy(np.stack([job.base_image, job.final_image()])).permute(0, 3, 1, 2).float() / 255
    want = build_reward("shapeclip")(shown, [PROMPT] * 2)["reward"]
    assert {r[0]: r[1:] for r in rows}["shapeclip"] == [f"{float(v):.3f}" for v in want]
    assert job.final_image().shape == (32, 32, 3)
    img = core.curve_image(job.history, job.method, job.base_reward())
    assert img.size == (560, 320)


def test_stop_ends_a_noise_job_early_and_cleanly(demo):
    with demo.run_lock:  # the job waits for the model: it is surely still running while we look
        job = demo.start_noise("s2", PROMPT, "base (shapeworld)", "best_of_n", "shapeworld", 40 * STEPS * 2,
                               steps=STEPS)
        assert "already running" in core.guard(demo.start_noise, "s2", PROMPT, None, "fk", "shapeclip", 100)[1]
        assert demo.stop_noise("s2").startswith("stopping")
    events = list(job.updates(timeout=120))
    job.join(10)
    assert job.error is None and job.result.info["stopped_early"]
    # asked before the first candidate finished: it ends after that one, with its image
    assert len(events) == 1 and job.result.trajectory.shape == (1, 1)
    assert job.result.nfe == STEPS * 2 and job.final_image().shape == (32, 32, 3)
    assert "stopped early" in job.status()
    assert demo.stop_noise("s2") == "no job is running"


def test_stop_in_the_middle_keeps_the_best_so_far(demo):
    job = demo.start_noise("s3", PROMPT, "base (shapeworld)", "best_of_n", "shapeworld", 200 * STEPS * 2,
                           steps=STEPS)
    for ev in job.updates(timeout=120):
        if ev.step == 2:
            demo.stop_noise("s3")
    job.join(10)
    r = job.result
    assert r.info["stopped_early"] and 3 <= r.trajectory.shape[0] < 200
    assert float(r.rewards["reward"][0]) == pytest.approx(float(r.trajectory[-1, 0]))


# ------------------------------------------------------------------------------------------------ runs tab
def test_run_view_shows_the_trainers_pngs_and_report(runs):
    assert core.list_runs(runs) == ["bad_run", "full_run", "lora_run", "plots_only"]
    v = core.run_view(runs, "lora_run")
    assert [c for _, c in v.images] == ["reward curve", "samples: trained"]
    assert v.report.startswith("### lora_run") and "LoRA" in v.summary and "nft" in v.summary
    assert "no report.md" in core.run_view(runs, "plots_only").report


# ------------------------------------------------------------------------------------------------ noise.py hook
@pytest.mark.parametrize("method, opts", [("best_of_n", {"n": 3}), ("fk", {"particles": 3}),
                                          ("carinox", {"n_explore": 3, "top_k": 2, "iterations": 1})])
def test_optimize_callback_changes_no_number(method, opts):
    a = _base_adapter()
    kw = dict(seed=2, guidance=2.0, num_steps=STEPS, **opts)
    plain = noise.optimize(a, [PROMPT, "a photo of two squares"], "shapeclip", method, **kw)
    seen = []
    hooked = noise.optimize(a, [PROMPT, "a photo of two squares"], "shapeclip", method,
                            callback=lambda p: seen.append(p) and False, **kw)
    assert torch.equal(plain.images, hooked.images) and torch.equal(plain.trajectory, hooked.trajectory)
    assert plain.nfe == hooked.nfe and not hooked.info["stopped_early"]
    assert all(p.reward.shape == (2,) and p.images.shape[:2] == (2, 3) for p in seen)
    steps = [p for p in seen if p.phase != "explore"]
    if method == "best_of_n":
        assert torch.equal(torch.stack([p.best for p in steps]), plain.trajectory)
    else:  # fk: one per resampling step; carinox: one per ReNO iterate
        assert torch.allclose(torch.stack([p.reward for p in steps]), plain.trajectory[:len(steps)])
    if method == "carinox":
        assert [p.step for p in seen if p.phase == "explore"] == [0, 1, 2]


def test_optimize_callback_true_stops_reno_after_that_iterate():
    a = _base_adapter()
    res = noise.optimize(a, [PROMPT], "shapeclip", "reno", iterations=20, seed=0, guidance=2.0, num_steps=STEPS,
                         callback=lambda p: p.step == 2)
    assert res.trajectory.shape == (3, 1) and res.info["stopped_early"]
    assert res.nfe < noise.cost_per_prompt("reno", STEPS, True, iterations=20, sampler_steps=4)
    assert res.images.shape == (1, 3, 32, 32)
    with pytest.raises(noise.NoiseOptError, match="callback must be callable"):
        noise.optimize(a, [PROMPT], "shapeclip", "reno", iterations=1, num_steps=STEPS, callback=3)


# ------------------------------------------------------------------------------------------------ the command
def test_demo_arguments_bind_to_localhost_and_never_share_by_default():
    import argparse

    from flowalign.app.app import add_arguments

    a = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (a.host, a.share, a.port, a.runs) == ("127.0.0.1", False, 7860, "runs")
    a = add_arguments(argparse.ArgumentParser()).parse_args(["--host", "0.0.0.0", "--share", "--port", "9000"])
    assert (a.host, a.share, a.port) == ("0.0.0.0", True, 9000)
