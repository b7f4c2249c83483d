"""End-to-end training on a tiny random SD3 replica: outputs, weights that move, resume, NaN rewards, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.rewards import Reward, RewardError, register
from flowalign.trainer import Trainer, TrainingError

ROOT = Path(__file__).parent.parent


class Brightness(Reward):
    """Mean pixel value: a smooth reward a random model can climb."""
    name = "test_brightness"

    def score(self, images, prompts, metadata):
        return {"reward": images.mean(dim=(1, 2, 3))}


class NaNFirst(Reward):
    """NaN for the first ``bad`` calls, brightness afterwards."""
    name = "test_nan"
    calls = 0
    bad = 1

    def score(self, images, prompts, metadata):
        NaNFirst.calls += 1
        r = images.mean(dim=(1, 2, 3))
        return {"reward": torch.full_like(r, float("nan")) if NaNFirst.calls <= NaNFirst.bad else r}


register("test_brightness")(lambda: Brightness())
register("test_nan")(lambda: NaNFirst())


def tiny_cfg(model_path, out, **over):
    d = {"model": {"path": model_path, "lora": {"rank": 4, "alpha": 8}},
         "sample": {"num_steps": 4, "prompts_per_iter": 2, "group_size": 4, "batch_size": 8},
         "algorithm": {"name": "grpo", "beta": 0.01},
         "train": {"iterations": 2, "lr": 1e-2, "batch_size": 4, "updates_per_iter": 2},
         "rewards": {"test_brightness": 1.0},
         "eval": {"num_steps": 2, "n_per_task": 1},
         "run": {"output_dir": str(out), "checkpoint_every": 1}}
    for k, v in over.items():
        if "__" in k:
            sec, key = k.split("__")
            d.setdefault(sec, {})[key] = v
        else:
            d[k] = v
    return load_config(d)


def lora_B(trainer):
    return {k: v.detach().clone() for k, v in trainer.trainable_state().items() if "lora_B" in k}


def test_two_iterations_train_and_write_everything(tiny_sd3, tmp_path):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run"))
    before = lora_B(t)
    assert before and all(v.abs().max() == 0 for v in before.values())
    t.run()
    after = lora_B(t)
    assert any(v.abs().max() > 0 for v in after.values())
    out = tmp_path / "run"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2]
    assert recs[0]["onpolicy_ratio_dev"] < 1e-5  # before the first optimizer step the ratio is 1
    assert recs[0]["ratio_dev"] > recs[0]["onpolicy_ratio_dev"]  # the second update is off-policy
    for f in ["final/pytorch_lora_weights.safetensors", "checkpoints/latest", "reward_curve.png", "compare_test.png",
              "samples/base.png", "samples/final.png", "results.json", "report.md", "evals.jsonl", "config.json"]:
        assert (out / f).exists(), f
    assert list((out / "tb").iterdir())
    res = json.loads((out / "results.json").read_text())
    assert set(res["final"]) == {"test", "unseen"} and res["iterations"] == 2
    # the run directory is what benchmarks/protocol_transfer.py reads (config.json + final/)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import protocol_transfer
    rows = protocol_transfer.main([str(out), "--model", tiny_sd3, "--protocols", "2x2", "--n-per-task", "1",
                                   "--threads", "1", "--out", str(tmp_path / "pt.json")])
    assert list(rows) == ["base", "run"]
    assert all(set(r) == {"ODE 2 steps, CFG 2", "training sampler (SDE)"} for r in rows.values())
    assert all(0 <= v <= 1 for r in rows.values() for v in r.values())


def test_protocol_transfer_scores_a_branching_run_with_its_own_sampler(tiny_adapter, monkeypatch):
    """With sample.branching the 'training sampler' row draws one stochastic step per image from the trained ones."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import protocol_transfer
    from flowalign.eval.benchmark import benchmark_metadata, subsample

    seen = []
    real = protocol_transfer.rollout

    def spy(*args, **kw):
        seen.append(args[5].clone())
        return real(*args, **kw)

    monkeypatch.setattr(protocol_transfer, "rollout", spy)
    metas = subsample(benchmark_metadata("shapeworld-geneval"), 2)
    cfg = {"sample": {"num_steps": 4, "sde_steps": "all_but_last", "guidance": 2.0, "noise_level": 0.7,
                      "kernel": "sde", "branching": True}, "algorithm": {"train_steps": "first:2"}}
    score = protocol_transfer.sde_score(tiny_adapter, metas, cfg, seed=0, batch_size=5)
    mask = torch.cat(seen)
    assert 0 <= score <= 1 and mask.shape == (len(metas), 4)
    assert (mask.sum(1) == 1).all() and not mask[:, 2:].any() and mask[:, 0].any() and mask[:, 1].any()


def test_resume_continues_at_the_same_step_with_the_same_state(tiny_sd3, tmp_path):
    out = tmp_path / "run"
    t1 = Trainer(tiny_cfg(tiny_sd3, out))
    t1.run()
    saved = lora_B(t1)
    opt_state = t1.opt.state_dict()
    t2 = Trainer(tiny_cfg(tiny_sd3, out, train__iterations=3))
    assert t2.iteration == 2
    for k, v in lora_B(t2).items():
        assert torch.equal(v, saved[k])
    s1, s2 = opt_state["state"], t2.opt.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    t2.run()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2, 3]


def test_resume_refuses_a_different_config(tiny_sd3, tmp_path):
    Trainer(tiny_cfg(tiny_sd3, tmp_path / "r", train__iterations=1)).run()
    with pytest.raises(TrainingError, match="different config"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "r", train__lr=0.5))


def test_nan_reward_skips_the_step_and_is_logged(tiny_sd3, tmp_path):
    NaNFirst.calls, NaNFirst.bad = 0, 1  # the first rollout chunk of iteration 1 is NaN
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "n", rewards={"test_nan": 1.0}))
    t.run()
    recs = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["skipped"] == "non-finite reward" and recs[0]["nan_skipped"] == 1
    assert "reward_mean" in recs[1] and "skipped" not in recs[1]
    assert t.nan_skipped == 1


def test_nan_reward_streak_stops_with_a_clear_error(tiny_sd3, tmp_path):
    NaNFirst.calls, NaNFirst.bad = 0, 10 ** 6
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "n", rewards={"test_nan": 1.0}, train__iterations=5,
                         train__max_nan_streak=3))
    with pytest.raises(TrainingError, match="non-finite .* in 3 iterations in a row"):
        t.run()


def test_unknown_reward_and_missing_model(tiny_sd3, tmp_path):
    with pytest.raises(RewardError, match="unknown reward 'pickscor'; known rewards: .*shapeworld"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "x", rewards={"pickscor": 1.0}))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Trainer(tiny_cfg(str(tmp_path / "nope"), tmp_path / "y"))


def _cli(args, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "flowalign.cli", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    r = _cli(["train", "--config", str(bad)])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("flowalign: error: unknown key 'train.lrr'")
    r = _cli(["eval", "--model", str(tmp_path / "missing"), "--benchmark", "shapeworld-geneval"])
    assert r.returncode == 2 and "model directory not found" in r.stderr.strip().splitlines()[-1]
    r = _cli(["eval", "--benchmark", "nope"])
    assert r.returncode == 2 and "unknown benchmark 'nope'" in r.stderr.strip().splitlines()[-1]


PLUGIN = """
import os
from flowalign.rewards import Reward


class Bright(Reward):
    name = "bright"

    def score(self, images, prompts, metadata):
        return {"reward": images.mean(dim=(1, 2, 3))}


class FailOnRank1(Bright):
    def score(self, images, prompts, metadata):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("boom on rank 1")
        return super().score(images, prompts, metadata)
"""


def _launch(tmp_path, cfg_dict, nproc: int):
    """Run flowalign/train.py under accelerate: 2 processes on the CPU is ACCELERATE_USE_CPU=1 with --multi_gpu
    (accelerate 1.15's --cpu flag always starts a single process)."""
    import yaml

    cfg = tmp_path / f"c{nproc}.yaml"
    cfg.write_text(yaml.safe_dump(cfg_dict))
    (tmp_path / "plug_rewards.py").write_text(PLUGIN)
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
             PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    mode = ["--multi_gpu", "--num_processes", "2"] if nproc == 2 else ["--num_processes", "1"]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "flowalign" / "train.py"), "--config", str(cfg)],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_two_process_cpu_run_equals_the_one_process_run(tiny_sd3, tmp_path):
    """Two MULTI_CPU (gloo) ranks really run: world size 2, both ranks' rewards gathered, one set of weights; and
    the same samples (named random streams) give the 1-process run's numbers up to float noise."""
    from safetensors.torch import load_file

    runs = {}
    for n in (1, 2):
        d = tiny_cfg(tiny_sd3, tmp_path / f"run{n}", sample={"num_steps": 4, "prompts_per_iter": 2, "group_size": 4,
                                                          "batch_size": 8},
                     train={"iterations": 2, "lr": 1e-2, "batch_size": 8, "updates_per_iter": 1}).to_dict()
        d["rewards"] = {"plug_rewards:Bright": 1.0}
        r = _launch(tmp_path, d, n)
        assert r.returncode == 0, r.stderr[-3000:]
        out = tmp_path / f"run{n}"
        conf = json.loads((out / "config.json").read_text())
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[n] = (conf, recs, load_file(str(out / "final" / "pytorch_lora_weights.safetensors")))
    (c1, r1, w1), (c2, r2, w2) = runs[1], runs[2]
    assert c1["world_size"] == 1 and c2["world_size"] == 2
    assert [x["iteration"] for x in r2] == [1, 2] and all(x["rewards_gathered"] == 8 for x in r1 + r2)
    for a, b in zip(r1, r2):
        for k in ("reward_mean", "reward_std", "kl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-8), k
    assert set(w1) == set(w2)
    moved = sum(float(v.abs().sum()) for v in w1.values())
    assert moved > 0 and sum(float((w1[k] - w2[k]).abs().sum()) for k in w1) < 1e-4 * moved


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_ends_both_processes(tiny_sd3, tmp_path):
    d = tiny_cfg(tiny_sd3, tmp_path / "fail", train={"iterations": 2, "batch_size": 4, "updates_per_iter": 1}).to_dict()
    d["rewards"] = {"plug_rewards:FailOnRank1": 1.0}
    r = _launch(tmp_path, d, 2)  # returns (does not hang until the 600 s timeout)
    assert r.returncode != 0
    assert "reward failed at iteration 1 on process 1: RuntimeError: boom on rank 1" in r.stderr


@pytest.mark.slow
def test_cli_eval_prints_a_table_and_writes_json_and_grid(tiny_sd3, tmp_path):
    r = _cli(["eval", "--model", tiny_sd3, "--benchmark", "shapeworld-geneval", "--n-per-task", "2", "--steps", "2",
              "--out", str(tmp_path / "ev")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| single_object |" in r.stdout and "| **overall** |" in r.stdout
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["n_per_task"] == {t: 2 for t in res["per_task"]} and len(res["per_task"]) == 6
    from PIL import Image
    assert Image.open(tmp_path / "ev" / "samples.png").size[1] > 6 * 32


def test_task_weights_choose_which_tasks_are_trained(tiny_sd3, tmp_path):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", data={"task_weights": {"position": 1.0, "counting": 0.0}},
                         sample={"num_steps": 4, "prompts_per_iter": 8, "group_size": 2, "batch_size": 16}))
    tags = {m["tag"] for it in range(10) for m in t.prompts_for(it)[1]}
    assert tags == {"position"}
    with pytest.raises(Exception, match="data.task_weights: no training prompts with tag.*'poem'"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "run2", data={"task_weights": {"poem": 1.0}}))
    with pytest.raises(Exception, match="data.task_weights: expected"):
        tiny_cfg(tiny_sd3, tmp_path / "run3", data={"task_weights": {"position": -1}})


def test_task_group_sizes_fill_the_iteration_with_groups_of_each_tasks_size(tiny_sd3, tmp_path):
    sample = {"num_steps": 4, "prompts_per_iter": 6, "group_size": 4, "batch_size": 24}
    plain = Trainer(tiny_cfg(tiny_sd3, tmp_path / "plain", sample=sample))
    tags = sorted(plain.by_task)
    # every task at the common size draws exactly what the plain sampler draws (same stream, same order)
    same = Trainer(tiny_cfg(tiny_sd3, tmp_path / "same", sample=dict(sample, task_group_sizes={t: 4 for t in tags})))
    for it in range(5):
        a, b = plain.prompts_for(it), same.prompts_for(it)
        assert a[0] == b[0] and a[2] == b[2] and [m["prompt"] for m in a[1]] == [m["prompt"] for m in b[1]]
    sizes = {"position": 7, "color_attr": 7, "single_object": 2}
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", sample=dict(sample, task_group_sizes=sizes)))
    seen = set()
    for it in range(20):
        groups, metas, members = t.prompts_for(it)
        assert len(groups) == 24  # prompts_per_iter x group_size images, whatever the mix
        by_g = {}
        for g, m, k in zip(groups, metas, members):
            by_g.setdefault(g, []).append((m["prompt"], m["tag"], k))
        order = sorted(by_g)
        assert order == list(range(t.n_groups))
        for g in order:
            rows = by_g[g]
            assert len({p for p, _, _ in rows}) == 1 and sorted(k for _, _, k in rows) == list(range(len(rows)))
            want = sizes.get(rows[0][1], 4)
            if g == order[-1]:  # the last group takes what is left (one more rather than leave a single image)
                assert 2 <= len(rows) <= want + 1
            else:
                assert len(rows) == want, (rows[0][1], len(rows))
            seen.add((rows[0][1], len(rows)))
    assert ("position", 7) in seen and ("single_object", 2) in seen and ("counting", 4) in seen
    with pytest.raises(ConfigError, match="sample.task_group_sizes: expected"):
        tiny_cfg(tiny_sd3, tmp_path / "bad", sample=dict(sample, task_group_sizes={"position": 1}))
    with pytest.raises(ConfigError, match="every size must be even"):
        tiny_cfg(tiny_sd3, tmp_path / "bad2", sample=dict(sample, shared_noise=True, antithetic=True,
                                                          task_group_sizes={"position": 5}))
    with pytest.raises(ConfigError, match="sample.task_group_sizes: no training prompts with tag.*'poem'"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "bad3", sample=dict(sample, task_group_sizes={"poem": 4})))


@pytest.mark.parametrize("shared", [False, True])
def test_shared_noise_gives_one_start_per_group(tiny_sd3, tmp_path, shared):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", train={"batch_size": 4, "updates_per_iter": 1},
                         sample={"num_steps": 4, "prompts_per_iter": 3, "group_size": 4,
                                                              "batch_size": 5, "shared_noise": shared}))
    traj, _, groups = t.collect(0)
    x_T = traj.latents[:, 0]
    for g in groups.unique():
        same = x_T[groups == g]
        assert torch.equal(same, same[:1].expand_as(same)) == shared
    assert not torch.equal(x_T[groups == 0][0], x_T[groups == 1][0])
    final = traj.latents[:, -1][groups == 0]
    assert not torch.allclose(final[0], final[1])  # the SDE steps still make the group's images differ


def test_branching_gives_each_group_one_stochastic_step_and_trains(tiny_sd3, tmp_path):
    """TempFlow branching: a group shares x_T and the ODE path up to one stochastic step (from the trained pool),
    so its members differ only after it; training replays each sample at its own step (ratio exactly 1)."""
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", train={"batch_size": 8, "updates_per_iter": 1, "lr": 1e-2},
                         algorithm={"name": "grpo", "train_steps": "first:2"},
                         sample={"num_steps": 4, "prompts_per_iter": 4, "group_size": 4, "batch_size": 6,
                                 "shared_noise": True, "branching": True, "sde_steps": "all_but_last"}))
    seen = set()
    for it in range(3):
        traj, rew, groups = t.collect(it)
        assert traj.sde_mask.shape == (16, 4) and (traj.sde_mask.sum(1) == 1).all()
        at = traj.sde_mask.float().argmax(1)
        for g in groups.unique():
            m = groups == g
            k = int(at[m][0])
            assert (at[m] == k).all() and k in (0, 1)  # one step per group, from first:2 of the SDE steps
            seen.add(k)
            lat = traj.latents[m]
            assert torch.equal(lat[:, 0], lat[:1, 0].expand_as(lat[:, 0]))  # one x_T per group
            # the shared ODE path up to the branching step: equal up to float noise (members sit in rollout
            # chunks of different composition, and a matmul's rounding depends on the batch it runs in)
            assert torch.allclose(lat[:, : k + 1], lat[:1, : k + 1].expand_as(lat[:, : k + 1]), atol=1e-5)
            assert (lat[0, k + 1] - lat[1, k + 1]).abs().max() > 0.1
    assert seen == {0, 1}
    before = lora_B(t)
    adv, _ = t.advantages(rew["reward"], groups)
    st = t.train_on(traj, adv, 0)
    assert st["onpolicy_ratio_dev"] < 1e-5 and st["trained_frac"] > 0
    assert any(not torch.equal(before[k], v) for k, v in lora_B(t).items())
    stats = t.branch_stats(rew["reward"], groups, traj.sde_mask)
    assert set(stats) <= {"branch_std/step0", "branch_std/step1"} and all(v >= 0 for v in stats.values())


def test_antithetic_pairs_get_opposite_noise(tiny_sd3, tmp_path):
    from flowalign.rollout import replay_step

    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", train={"batch_size": 8, "updates_per_iter": 1},
                         sample={"num_steps": 4, "prompts_per_iter": 2, "group_size": 4, "batch_size": 8,
                                 "shared_noise": True, "antithetic": True, "sde_steps": "first:2"}))
    traj, _, groups = t.collect(0)
    _, _, members = t.prompts_for(0)
    members = torch.tensor(members)
    for g in groups.unique():
        for k in (0, 1):
            pairs = {}
            for b in (groups == g).nonzero().view(-1).tolist():
                out = replay_step(t.adapter, traj.index([b]), k)
                pairs.setdefault(int(members[b]) // 2, []).append((out.next - out.mean) / out.std)
            for a, b in pairs.values():
                assert torch.allclose(a, -b, atol=1e-4) and a.abs().mean() > 0.3  # eps and -eps, standard size


@pytest.mark.slow
def test_a_smooth_reward_climbs_on_the_shapeworld_model(tmp_path):
    """The real 2.3 M-param ShapeWorld model, Flow-GRPO on mean brightness for 12 iterations: the reward rises."""
    cfg = tiny_cfg("shapeworld", tmp_path / "run", model={"path": "shapeworld", "lora": {"enabled": False}},
                   sample={"num_steps": 6, "prompts_per_iter": 4, "group_size": 8, "batch_size": 32},
                   train={"iterations": 12, "lr": 1e-3, "batch_size": 32}, algorithm={"name": "grpo"},
                   eval={"num_steps": 2, "n_per_task": 1}, run={"output_dir": str(tmp_path / "run"),
                                                                  "checkpoint_every": 0})
    Trainer(cfg).run()
    r = [json.loads(x)["reward_mean"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.02, r  # measured: 0.850 -> 0.895


def test_grad_snr_benchmark_runs_on_the_tiny_model(tiny_sd3, tmp_path):
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grad_snr
    d = tiny_cfg(tiny_sd3, tmp_path / "run").to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    res = grad_snr.main(["--config", str(tmp_path / "c.yaml"), "--batches", "3", "--threads", "1", "--brightness"])
    assert res["pairs"] == 3 and -1 <= res["mean_cos"] <= 1 and res["samples_per_batch"] == 8


def test_supervised_reference_benchmark_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import supervised_reference
    rows = supervised_reference.main(["--chunk", "2", "--chunks", "1", "--n-per-task", "1", "--steps", "2",
                                      "--threads", "1", "--out", str(tmp_path / "s.jsonl"), "--save", str(tmp_path / "m")])
    assert [r["steps"] for r in rows] == [0, 2] and len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    assert all(0 <= r["overall"] <= 1 and len(r["per_task"]) == 6 for r in rows)
    # the saved chunk is a model folder the evaluation loads; two steps at the recipe's lr moved the weights
    from flowalign.pipelines.base import load_adapter
    from flowalign.shapeworld import MODEL_DIR
    saved, base = load_adapter(str(tmp_path / "m" / "steps_2")), load_adapter(str(MODEL_DIR))
    for part in ("transformer", "text_encoder"):
        a, b = getattr(saved.pipe, part).state_dict(), getattr(base.pipe, part).state_dict()
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), part


def test_pairwise_reward_is_finished_on_whole_groups_keyed_by_group_id(tiny_sd3, tmp_path):
    """Rollout chunks of 3 split the groups of 4, and the same prompt drawn twice makes two groups: the win rates
    are still computed per group id over the whole group (mean 1/2, values k/3), not per chunk or per prompt."""
    from flowalign.rewards import Pairwise
    from flowalign.rewards.combine import WeightedSum

    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", sample={"num_steps": 2, "prompts_per_iter": 6, "group_size": 4,
                                                              "batch_size": 3},
                         train={"batch_size": 24, "updates_per_iter": 1}))
    t.train_meta = t.train_meta[:1]  # one prompt: every group of the iteration has the same text
    t.by_task = {"only": [0]}
    for reward in (Pairwise(Brightness()), WeightedSum({"pw": Pairwise(Brightness()), "b": Brightness()},
                                                        {"pw": 1.0, "b": 0.0})):
        t.reward = reward
        traj, rew, groups = t.collect(0)
        assert len(set(traj.prompts)) == 1 and len(groups.unique()) == 6
        done = t.group_rewards(rew, groups)
        r = done["reward"]
        raw = done["test_brightness"] if "test_brightness" in done else done["pw/test_brightness"]
        for g in groups.unique():
            m = groups == g
            assert r[m].mean().item() == pytest.approx(0.5)
            assert sorted((r[m] * 3).round().tolist()) == [0.0, 1.0, 2.0, 3.0]  # distinct scores: ranks 0..3
            assert r[m].argmax() == raw[m].argmax()
        assert not torch.allclose(r, rew["reward"])  # the per-chunk, per-prompt win rates were wrong


def test_output_dir_that_is_a_file_or_holds_a_finished_run_is_a_one_line_error(tiny_sd3, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"run.output_dir: .*file is an existing file, not a directory"):
        Trainer(tiny_cfg(tiny_sd3, f))
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"run.output_dir: .*old already holds a run .*run.resume is false"):
        Trainer(tiny_cfg(tiny_sd3, out, run={"output_dir": str(out), "resume": False}))


def test_an_empty_trained_step_pool_and_a_bad_resolution_are_config_errors(tiny_sd3, tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm.train_steps: 'sde' leaves no stochastic step to train"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "a", sample={"num_steps": 4, "prompts_per_iter": 2, "group_size": 4,
                                                            "batch_size": 8, "sde_steps": []}))
    with pytest.raises(ConfigError, match=r"model.resolution: image size 36x36 must be a multiple of 8"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "b", model={"path": tiny_sd3, "resolution": 36}))
    # 48 px is a multiple of 8, but 48 / 8 = 6 patches a side exceed the tiny transformer's 4x4 positional table
    with pytest.raises(ConfigError, match=r"model.resolution: image size 48x48 is larger than this transformer's "
                                          r"positional embedding allows \(at most 32 px a side\)"):
        Trainer(tiny_cfg(tiny_sd3, tmp_path / "c", model={"path": tiny_sd3, "resolution": 48}))


def test_model_resolution_is_the_size_the_run_samples_at(tiny_sd3, tmp_path):
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "r", model={"path": tiny_sd3, "resolution": 16,
                                                           "lora": {"rank": 4, "alpha": 8}}))
    assert t.adapter.latent_shape() == (4, 4, 4)  # 16 px through the tiny VAE (x4)
    assert t.collect(0)[0].images.shape[-2:] == (16, 16)


def test_accumulation_weights_mini_batches_by_their_samples_after_the_zero_advantage_filter(tiny_sd3, tmp_path):
    """The gradient of an iteration's update is that of the mean loss over the kept samples, whatever the
    mini-batching: batch 3 over 5 kept samples (mini-batches of 3 and 2, one optimizer step) equals one batch of 5."""
    from flowalign.algorithms import Work

    grads = {}
    for bs in (3, 8):
        t = Trainer(tiny_cfg(tiny_sd3, tmp_path / f"r{bs}", train={"batch_size": bs, "updates_per_iter": 1,
                                                                     "lr": 1e-2, "max_grad_norm": 0.0}))
        traj, rew, groups = t.collect(0)
        adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, -0.5, 0.0, 0.3])  # 5 kept
        work = t.algo.plan(traj, adv, 0, torch.Generator().manual_seed(0))
        assert len(work.keep) == 5
        seen = []
        t.opt.step = lambda: seen.append(torch.cat([p.grad.flatten().clone() for p in t.params]))
        t._train_passes(work, {}, torch.Generator().manual_seed(0))
        assert len(seen) == 1
        grads[bs] = seen[0]
    assert torch.allclose(grads[3], grads[8], rtol=1e-4, atol=1e-9) and grads[8].abs().max() > 0


def test_compare_and_seeds_reports_read_a_finished_run(tiny_sd3, tmp_path):
    """benchmarks/compare_algorithms.py's curves and table, and seeds_report.py's row, on a real 2-iteration run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_algorithms
    import seeds_report

    out = tmp_path / "cmp" / "tiny"
    Trainer(tiny_cfg(tiny_sd3, out, eval={"num_steps": 2, "n_per_task": 1, "every": 1, "guidance": [1.5, 2.0]},
                     run={"output_dir": str(out), "checkpoint_every": 0})).run()
    c = compare_algorithms.curves(out)
    assert c["images"] == [0, 8, 16] and c["algorithm"] == "grpo" and len(c["headline"]) == 3
    assert c["minutes"][0] == 0 and c["minutes"][1] < c["minutes"][2]
    table = compare_algorithms.report({"tiny": c}, tmp_path / "cmp")
    assert "| tiny | grpo | 16 |" in table and (tmp_path / "cmp" / "compare.png").is_file()
    res = json.loads((out / "results.json").read_text())
    line, ok = seeds_report.row("tiny", res, 0.15)
    d = res["final"]["test"]["overall"] - res["base"]["test"]["overall"]
    se = seeds_report.se_diff(res["base"]["test"]["se_overall"], res["final"]["test"]["se_overall"])
    assert f"{d:+.3f} ± {se:.3f}" in line and ok == (d > 2 * se and "| none |" in line)
    assert seeds_report.delta(res) == (d, se)
    text = seeds_report.main([f"my label={out}", "--plot", str(tmp_path / "deltas.png")])
    assert text.splitlines()[2].startswith("| my label | ") and (tmp_path / "deltas.png").stat().st_size > 1000


def test_base_from_reuses_the_base_evaluation_only_under_the_same_protocol(tiny_sd3, tmp_path):
    first = tmp_path / "a"
    Trainer(tiny_cfg(tiny_sd3, first, train__iterations=1)).run()
    base_a = json.loads((first / "base_eval.json").read_text())
    # a different training config (lr, LoRA rank) may reuse it: the base's figures do not depend on those
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "b", train__iterations=1, train__lr=1e-3,
                         model={"path": tiny_sd3, "lora": {"rank": 2, "alpha": 4}},
                         eval={"num_steps": 2, "n_per_task": 1, "base_from": str(first)}))
    calls = []
    t.evaluate = lambda tag, _orig=t.evaluate: calls.append(tag) or _orig(tag)
    res = t.run()
    assert calls == ["final"]  # the base was not judged again
    assert res["base"] == base_a
    assert json.loads((tmp_path / "b" / "base_eval.json").read_text()) == base_a
    # another eval protocol is refused, naming what differs
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "c", train__iterations=1,
                         eval={"num_steps": 3, "n_per_task": 1, "base_from": str(first)}))
    with pytest.raises(TrainingError, match=r"eval.base_from: .*differs in eval\.num_steps"):
        t.run()
    t = Trainer(tiny_cfg(tiny_sd3, tmp_path / "d", train__iterations=1,
                         eval={"num_steps": 2, "n_per_task": 1, "base_from": str(tmp_path / "nowhere")}))
    with pytest.raises(TrainingError, match="has no config.json and base_eval.json"):
        t.run()


def test_lr_schedule_by_hand_and_logged_per_iteration(tiny_sd3, tmp_path):
    from types import SimpleNamespace

    from flowalign.trainer import lr_factor

    t = SimpleNamespace(iterations=5, lr_warmup=0, lr_schedule="cosine", lr_final=0.1)
    # cosine from 1 at iteration 0 to 0.1 at iteration 4: 0.1 + 0.9 * (1 + cos(pi * i / 4)) / 2
    assert [lr_factor(t, i) for i in range(5)] == pytest.approx([1.0, 0.1 + 0.9 * (1 + 2 ** -0.5) / 2, 0.55,
                                                                 0.1 + 0.9 * (1 - 2 ** -0.5) / 2, 0.1])
    t = SimpleNamespace(iterations=6, lr_warmup=2, lr_schedule="linear", lr_final=0.0)
    # warm-up 1/2, 2/2, then linear from 1 (iteration 2) to 0 (iteration 5)
    assert [lr_factor(t, i) for i in range(6)] == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    t = SimpleNamespace(iterations=3, lr_warmup=0, lr_schedule="constant", lr_final=0.0)
    assert [lr_factor(t, i) for i in range(3)] == [1.0, 1.0, 1.0]
    # the trainer sets the optimizer's lr from it every iteration and logs it
    tr = Trainer(tiny_cfg(tiny_sd3, tmp_path / "run", train={"iterations": 3, "lr": 1e-2, "batch_size": 4,
                                                              "lr_schedule": "linear", "lr_final": 0.5}))
    tr.run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in recs] == pytest.approx([1e-2, 0.75e-2, 0.5e-2])
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)
