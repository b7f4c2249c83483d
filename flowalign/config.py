"""One typed config per job, loaded from YAML and validated on load.

An unknown key or a bad value is a one-line ``ConfigError`` naming the key (``train.lr``) and what is allowed.
The user states intent (prompts per iteration, group size, per-device batch, optimizer updates per iteration);
derived numbers (batches per iteration, accumulation) are computed in ``Derived``, never asked twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LoraCfg:
    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    init: Literal["gaussian", "default"] = "gaussian"


@dataclass
class ModelCfg:
    path: str = "shapeworld"           # a diffusers dir, a hub id, or "shapeworld" (the shipped tiny model)
    family: Union[str, None] = None    # read from model_index.json when None
    resolution: Union[int, None] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraCfg = field(default_factory=LoraCfg)
    gradient_checkpointing: bool = False


@dataclass
class SampleCfg:
    num_steps: int = 10
    guidance: float = 2.0
    noise_level: float = 0.7
    kernel: Literal["sde", "cps", "ddim"] = "sde"   # ddim: DDIM with eta = noise_level (DDPM families; DDPO)
    noise_block: int = 1                           # SDE noise only in f x f block-constant latents (1: flow_grpo)
    sde_steps: Union[str, list] = "all_but_last"  # 'all', 'all_but_last', 'first:K' or a list of step indices
    prompts_per_iter: int = 16                     # distinct prompts per iteration (all processes together)
    group_size: int = 8                            # images per prompt
    task_group_sizes: Union[dict, None] = None     # {tag: images per prompt} for that task's groups (others:
                                                   # group_size); an iteration still holds prompts_per_iter x
                                                   # group_size images: prompts are drawn until those are filled
    batch_size: int = 64                           # rollout chunk per process
    shared_noise: bool = False                     # one x_T per prompt group (DanceGRPO): outcome differences
                                                   # then come only from the SDE steps, the actions trained on
    branching: bool = False                        # TempFlow-style: each group is stochastic at one step only (drawn
                                                   # per group from the trained SDE steps), ODE elsewhere, so its
                                                   # reward differences are that step's credit; needs shared_noise
    antithetic: bool = False                       # members 2k and 2k+1 of a group get opposite SDE noise (mirrored
                                                   # sampling: cancels the even part of the reward in the estimate)


@dataclass
class TrainCfg:
    iterations: int = 100
    lr: float = 3e-4
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup: int = 0                 # iterations of linear warm-up
    lr_final: float = 0.0              # cosine / linear: the last iteration's lr as a fraction of lr
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    cfg_grad: Literal["both", "cond"] = "both"  # with CFG: train through both branches (flow_grpo) or the
                                                # conditional one only (the update then transfers across CFG scales)
    inner_epochs: int = 1
    batch_size: int = 64               # training minibatch per process
    updates_per_iter: int = 1          # optimizer steps per iteration and inner epoch
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0             # 0 = no EMA
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_nan_streak: int = 3


@dataclass
class DataCfg:
    train: str = "shapeworld:train"     # GenEval metadata .jsonl, or shapeworld:<train|test|test_unseen>
    eval: str = "shapeworld:test"
    eval_unseen: Union[str, None] = "shapeworld:test_unseen"
    task_weights: Union[dict, None] = None  # {tag: weight}: how often each task's prompts are drawn (default equal;
                                            # weight 0 leaves a task out of training, not out of evaluation)


@dataclass
class EvalCfg:
    num_steps: int = 20
    guidance: Union[float, list] = 2.0  # a CFG scale, or a grid: each model is headlined at its best one
    every: int = 0                      # iterations between evaluations (0: only before and after)
    n_per_task: int = 100
    seed: int = 1000
    batch_size: int = 200
    judge: Literal["shapeworld", "reward"] = "shapeworld"  # 'reward': report the training reward per tag
    base_from: Union[str, None] = None  # a finished run's directory: reuse its base evaluation (base_eval.json)
                                        # instead of judging the base again; its model, data and eval protocol
                                        # must equal this run's (checked), so the figures are the same


@dataclass
class RunCfg:
    output_dir: str = "runs/shapeworld_flow_grpo"
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = True                 # continue from output_dir/checkpoints/latest when it exists


def _default_algorithm():
    from flowalign.algorithms import GRPO

    return GRPO.Config()


# keys that moved from train: to the algorithm's own section (a one-line error names the new place)
MOVED = {f"train.{k}": f"algorithm.{k}" for k in ("clip_range", "adv_clip", "global_std", "beta", "train_steps",
                                                    "timestep_fraction", "step_weighting")}
MOVED["train.algorithm"] = "algorithm.name"


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    algorithm: typing.Any = field(default_factory=_default_algorithm)  # the algorithm's own config dataclass
    train: TrainCfg = field(default_factory=TrainCfg)
    rewards: dict = field(default_factory=lambda: {"shapeworld": 1.0})
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what changes the training (not where it is written or how often it is evaluated)."""
        d = self.to_dict()
        for k in ("run", "eval"):
            d.pop(k)
        d["train"].pop("iterations")  # a run may be resumed with a longer schedule
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ validation
def _check_value(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {'list' if tp is list else 'mapping'}, got {value!r}")
        return value
    return value


def _from_dict(cls, d, prefix: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in MOVED:
            raise ConfigError(f"'{key}' moved to '{MOVED[key]}' (the algorithm's own section: "
                              f"algorithm: {{name: grpo, ...}})")
        if cls is Config and k == "algorithm":
            kw[k] = _algorithm_from_dict(v)
            continue
        if k not in names:
            raise ConfigError(f"unknown key '{key}'; allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kw[k] = _check_value(v, hints[k], key)
    return cls(**kw)


def _algorithm_from_dict(d):
    from flowalign.algorithms import ALGORITHMS

    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, dict):
        raise ConfigError(f"algorithm: expected a mapping such as {{name: grpo, ...}}, got {d!r}")
    name = d.get("name", "grpo")
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: {name!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, ALGORITHMS))}")
    return _from_dict(ALGORITHMS[name].Config, dict(d, name=name), "algorithm")


def _err(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def _positive(key: str, v, allow_zero: bool = False):
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def validate(cfg: Config) -> Config:
    s, t = cfg.sample, cfg.train
    for key, v in [("sample.num_steps", s.num_steps), ("sample.prompts_per_iter", s.prompts_per_iter),
                   ("sample.group_size", s.group_size), ("sample.batch_size", s.batch_size),
                   ("train.iterations", t.iterations), ("train.lr", t.lr), ("train.batch_size", t.batch_size),
                   ("train.inner_epochs", t.inner_epochs), ("train.updates_per_iter", t.updates_per_iter),
                   ("eval.num_steps", cfg.eval.num_steps),
                   ("eval.n_per_task", cfg.eval.n_per_task), ("model.lora.rank", cfg.model.lora.rank)]:
        _positive(key, v)
    for key, v in [("sample.noise_level", s.noise_level), ("train.max_grad_norm", t.max_grad_norm),
                   ("train.weight_decay", t.weight_decay), ("eval.every", cfg.eval.every),
                   ("run.checkpoint_every", cfg.run.checkpoint_every)]:
        _positive(key, v, allow_zero=True)
    if s.noise_block < 1 or (s.noise_block > 1 and s.kernel != "sde"):
        raise ConfigError(f"sample.noise_block: must be >= 1, and > 1 only with sample.kernel: sde "
                          f"(got {s.noise_block} with kernel {s.kernel!r})")
    if s.branching and not s.shared_noise:
        raise ConfigError("sample.branching: the branches of a group must share x_T; set sample.shared_noise: true")
    if s.antithetic and (not s.shared_noise or s.group_size % 2):
        raise ConfigError(f"sample.antithetic: pairs (+noise, -noise) need sample.shared_noise: true and an even "
                          f"sample.group_size (got shared_noise={s.shared_noise}, group_size={s.group_size})")
    if s.group_size < 2:
        raise ConfigError(f"sample.group_size: group advantages need at least 2 images per prompt, got {s.group_size}")
    eg = cfg.eval.guidance if isinstance(cfg.eval.guidance, list) else [cfg.eval.guidance]
    if not eg or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in eg):
        raise ConfigError(f"eval.guidance: expected a CFG scale or a list of them, got {cfg.eval.guidance!r}")
    if isinstance(cfg.eval.guidance, list):
        cfg.eval.guidance = [float(g) for g in eg]
    for key, g in [("sample.guidance", s.guidance)] + [("eval.guidance", g) for g in eg]:
        if not g >= 1:
            raise ConfigError(f"{key}: the CFG scale must be >= 1 (1 = no guidance), got {g}")
    top = {"sde": 2.0, "cps": 1.0, "ddim": 1.0}[s.kernel]
    if s.noise_level > top:
        raise ConfigError(f"sample.noise_level: must be in [0, {top:g}] for kernel {s.kernel!r} (flow_grpo uses 0.7), "
                          f"got {s.noise_level}")
    if cfg.model.resolution is not None and cfg.model.resolution <= 0:
        raise ConfigError(f"model.resolution: must be > 0 (pixels), got {cfg.model.resolution}")
    from flowalign.algorithms import ALGORITHMS

    algo = ALGORITHMS[cfg.algorithm.name]
    cfg.algorithm.validate(_err)
    if not algo.stochastic:
        for key in ("shared_noise", "branching", "antithetic"):
            if getattr(s, key):
                raise ConfigError(f"sample.{key}: algorithm {cfg.algorithm.name!r} rolls out with the ODE (no SDE "
                                  f"steps), so there is nothing to share or branch; set sample.{key}: false")
    if t.lr_warmup < 0:
        raise ConfigError(f"train.lr_warmup: must be >= 0 (iterations), got {t.lr_warmup}")
    if not 0 <= t.lr_final <= 1:
        raise ConfigError(f"train.lr_final: a fraction of train.lr in [0, 1], got {t.lr_final}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas: expected two numbers, got {t.adam_betas!r}")
    from flowalign.rollout import sde_mask

    try:
        sde_mask(s.num_steps, s.sde_steps)
    except ValueError as e:
        raise ConfigError(f"sample.sde_steps: {e}") from None
    tw = cfg.data.task_weights
    if tw is not None:
        if not tw or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in tw.values()) \
                or not any(v > 0 for v in tw.values()):
            raise ConfigError(f"data.task_weights: expected {{tag: weight >= 0}} with a positive weight, got {tw!r}")
    tg = s.task_group_sizes
    if tg is not None:
        if not isinstance(tg, dict) or not tg or any(isinstance(v, bool) or not isinstance(v, int) or v < 2
                                                     for v in tg.values()):
            raise ConfigError(f"sample.task_group_sizes: expected {{tag: images per prompt >= 2}}, got {tg!r}")
        if s.antithetic and any(v % 2 for v in tg.values()):
            raise ConfigError(f"sample.task_group_sizes: sample.antithetic pairs members, so every size must be even, "
                              f"got {tg!r}")
    if not isinstance(cfg.rewards, dict) or not cfg.rewards:
        raise ConfigError("rewards: give at least one reward, e.g. {shapeworld: 1.0}")
    return cfg


def load_config(path_or_dict, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config (or a dict); overrides are 'section.key=value' strings (YAML values)."""
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if d is None:  # an empty file would otherwise run the whole default job
            raise ConfigError(f"{p}: the config file is empty; start from one of configs/*.yaml")
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: a config is a mapping of sections (model:, sample:, train:, ...), "
                              f"got a {type(d).__name__}")
    d = json.loads(json.dumps(d))  # deep copy
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected section.key=value")
        k, v = o.split("=", 1)
        cur = d
        parts = k.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {o!r}: {part!r} is not a section")
        cur[parts[-1]] = yaml.safe_load(v)
    return validate(_from_dict(Config, d))


@dataclass
class Derived:
    """Numbers computed from the config and the number of processes."""
    world: int
    samples_per_iter: int        # all processes
    samples_per_process: int
    rollout_chunks: int          # per process
    minibatches: int             # per process, per inner epoch
    accumulation: int            # minibatches per optimizer step

    @classmethod
    def of(cls, cfg: Config, world: int) -> "Derived":
        s, t = cfg.sample, cfg.train
        total = s.prompts_per_iter * s.group_size
        if total % world:
            raise ConfigError(f"sample.prompts_per_iter x sample.group_size = {total} samples must split evenly over "
                              f"{world} processes")
        per = total // world
        mb = -(-per // t.batch_size)
        if mb % t.updates_per_iter:
            raise ConfigError(f"train.updates_per_iter={t.updates_per_iter} must divide the {mb} training minibatches "
                              f"per process (samples per process {per} / train.batch_size {t.batch_size})")
        return cls(world=world, samples_per_iter=total, samples_per_process=per,
                   rollout_chunks=-(-per // s.batch_size), minibatches=mb, accumulation=mb // t.updates_per_iter)
