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
    ({"train": {"lrr": 1e-4}}, r"unknown key 'train.lrr'; allowed keys in train: iterations, lr"),
    ({"trainer": {}}, r"unknown key 'trainer'"),
    ({"train": {"lr": "fast"}}, r"train.lr: expected a number, got 'fast'"),
    ({"train": {"lr": -1.0}}, r"train.lr: must be > 0"),
    ({"train": {"lr_schedule": "step"}}, r"train.lr_schedule: 'step' is not allowed; choose one of 'constant', "
                                         r"'cosine', 'linear'"),
    ({"train": {"lr_warmup": -1}}, r"train.lr_warmup: must be >= 0"),
    ({"train": {"lr_final": 1.5}}, r"train.lr_final: a fraction of train.lr in \[0, 1\], got 1.5"),
    ({"sample": {"group_size": 1}}, r"sample.group_size: group advantages need at least 2"),
    ({"sample": {"kernel": "euler"}}, r"sample.kernel: 'euler' is not allowed; choose one of 'sde', 'cps'"),
    ({"sample": {"sde_steps": "first:x"}}, r"sample.sde_steps"),
    ({"model": {"lora": {"rank": 1.5}}}, r"model.lora.rank: expected an integer"),
    ({"algorithm": {"train_steps": "last:2"}}, r"algorithm.train_steps: use 'sde' or 'first:K'"),
    ({"train": {"train_steps": "first:2"}}, r"'train.train_steps' moved to 'algorithm.train_steps'"),
    ({"train": {"beta": 0.1}}, r"'train.beta' moved to 'algorithm.beta'"),
    ({"algorithm": {"name": "ppo"}}, r"algorithm.name: 'ppo' is not allowed; choose one of 'grpo', 'nft', 'awm'"),
    ({"algorithm": {"name": "nft", "clip_range": 0.1}}, r"unknown key 'algorithm.clip_range'; allowed keys in "
                                                          r"algorithm: name, beta"),
    ({"algorithm": {"name": "nft", "beta": 0}}, r"algorithm.beta: must be > 0, got 0"),
    ({"algorithm": {"name": "nft", "t_range": [0.5, 0.2]}}, r"algorithm.t_range: expected \[lo, hi\]"),
    ({"algorithm": {"name": "awm", "ema_decay": 1.0}}, r"algorithm.ema_decay: must be in \[0, 1\)"),
    ({"algorithm": {"name": "grpo", "beta": -1}}, r"algorithm.beta: must be >= 0"),
    ({"algorithm": [1, 2]}, r"algorithm: expected a mapping"),
    ({"algorithm": {"name": "nft"}, "sample": {"shared_noise": True}},
     r"sample.shared_noise: algorithm 'nft' rolls out with the ODE"),
    ({"sample": {"guidance": -2.0}}, r"sample.guidance: the CFG scale must be >= 1"),
    ({"eval": {"guidance": 0.5}}, r"eval.guidance: the CFG scale must be >= 1"),
    ({"sample": {"noise_level": 10.0}}, r"sample.noise_level: must be in \[0, 2\] for kernel 'sde'"),
    ({"sample": {"noise_level": 1.5, "kernel": "cps"}}, r"sample.noise_level: must be in \[0, 1\] for kernel 'cps'"),
    ({"model": {"resolution": 0}}, r"model.resolution: must be > 0"),
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


def test_empty_and_non_mapping_config_files_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: the config file is empty"):
        load_config(empty)
    lst = tmp_path / "list.yaml"
    lst.write_text("- train\n- sample\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a config is a mapping of sections .*got a list"):
        load_config(lst, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"override 'train.lr.x=1': 'lr' is not a section"):
        load_config({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_algorithm_section_builds_its_own_config():
    from flowalign.algorithms import AWM, GRPO, NFT

    assert isinstance(load_config({}).algorithm, GRPO.Config)  # the default algorithm
    nft = load_config({"algorithm": {"name": "nft", "beta": 0.5, "t_range": [0.1, 0.9]}}).algorithm
    assert isinstance(nft, NFT.Config) and nft.beta == 0.5 and nft.t_range == [0.1, 0.9] and nft.decay_max == 0.5
    assert isinstance(load_config({"algorithm": "awm"}).algorithm, AWM.Config)
    a, b = load_config({"algorithm": {"name": "nft"}}), load_config({"algorithm": {"name": "nft", "beta": 0.5}})
    assert a.hash() != b.hash() and a.to_dict()["algorithm"]["name"] == "nft"
    assert load_config({}, ["algorithm.name=nft", "algorithm.kl_beta=0.1"]).algorithm.kl_beta == 0.1
    on = load_config({}, ["algorithm.name=nft", "algorithm.balance=true", "algorithm.negatives=false"]).algorithm
    assert on.balance is True and on.negatives is False and on.adaptive_weight is True
    for key in ("balance", "negatives", "adaptive_weight"):
        with pytest.raises(ConfigError, match=rf"algorithm.{key}: expected true/false, got 'maybe'"):
            load_config({}, ["algorithm.name=nft", f"algorithm.{key}=maybe"])


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
