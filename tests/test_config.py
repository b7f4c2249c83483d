"""Config loading: every shipped config loads; bad keys and values are one-line errors naming the key."""
from pathlib import Path

import pytest

from flowalign.config import ConfigError, Derived, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.hash() == load_config(path).hash()


@pytest.mark.parametrize("d,msg", [
    ({"train": {"lrr": 1e-4}}, r"unknown key 'train.lrr'; allowed keys in train: algorithm, iterations, lr"),
    ({"trainer": {}}, r"unknown key 'trainer'"),
    ({"train": {"lr": "fast"}}, r"train.lr: expected a number, got 'fast'"),
    ({"train": {"lr": -1.0}}, r"train.lr: must be > 0"),
    ({"sample": {"group_size": 1}}, r"sample.group_size: GRPO needs at least 2"),
    ({"sample": {"kernel": "euler"}}, r"sample.kernel: 'euler' is not allowed; choose one of 'sde', 'cps'"),
    ({"sample": {"sde_steps": "first:x"}}, r"sample.sde_steps"),
    ({"model": {"lora": {"rank": 1.5}}}, r"model.lora.rank: expected an integer"),
    ({"train": {"train_steps": "last:2"}}, r"train.train_steps: use 'sde' or 'first:K'"),
    ({"rewards": {}}, r"rewards: give at least one reward"),
    ({"sample": {"noise_block": 0}}, r"sample.noise_block: must be >= 1"),
    ({"sample": {"noise_block": 2, "kernel": "cps"}}, r"sample.noise_block: .* only with sample.kernel: sde"),
    ({"train": {"cfg_grad": "uncond"}}, r"train.cfg_grad: 'uncond' is not allowed"),
])
def test_bad_values_name_the_key(d, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(d)


def test_malformed_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides():
    cfg = load_config({}, ["train.lr=0.5", "sample.sde_steps=first:3", "rewards={jpeg_compressibility: 1.0}"])
    assert cfg.train.lr == 0.5 and cfg.sample.sde_steps == "first:3"
    assert cfg.rewards == {"jpeg_compressibility": 1.0}
    assert load_config({}, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads this as a string


def test_derived_numbers():
    cfg = load_config({"sample": {"prompts_per_iter": 6, "group_size": 4, "batch_size": 5},
                       "train": {"batch_size": 3, "updates_per_iter": 2}})
    d = Derived.of(cfg, world=2)
    assert (d.samples_per_iter, d.samples_per_process, d.rollout_chunks, d.minibatches, d.accumulation) == \
        (24, 12, 3, 4, 2)
    with pytest.raises(ConfigError, match="must split evenly over 5 processes"):
        Derived.of(cfg, world=5)
    with pytest.raises(ConfigError, match="updates_per_iter=3 must divide"):
        Derived.of(load_config({"train": {"updates_per_iter": 3, "batch_size": 64}}), world=1)


def test_hash_ignores_run_eval_and_length_but_not_training():
    a = load_config({})
    assert a.hash() == load_config({"run": {"output_dir": "x"}, "train": {"iterations": 7}}).hash()
    assert a.hash() != load_config({"train": {"lr": 1e-5}}).hash()


def test_branching_and_antithetic_need_a_shared_start():
    ok = load_config({"sample": {"shared_noise": True, "branching": True, "antithetic": True, "group_size": 8}})
    assert ok.sample.branching and ok.sample.antithetic
    with pytest.raises(ConfigError, match="sample.branching: .*shared_noise: true"):
        load_config({"sample": {"branching": True}})
    with pytest.raises(ConfigError, match="sample.antithetic: .*even sample.group_size .*group_size=5"):
        load_config({"sample": {"shared_noise": True, "antithetic": True, "group_size": 5}})
    with pytest.raises(ConfigError, match="sample.antithetic"):
        load_config({"sample": {"antithetic": True}})
