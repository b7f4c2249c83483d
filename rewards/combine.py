"""Reward combinators (themselves ``Reward``s) and ``build_rewards``, the parser of the config syntax.

- ``WeightedSum``: ``reward = sum_i w_i * r_i``, optionally with each ``r_i`` normalised by a running mean/std
  (``RunningStats``: every call first adds the batch's scores to the statistics, then normalises the batch with
  them; Welford over everything seen, or an exponential moving average with ``momentum``; std counts as 1 until
  two scores are seen). The statistics are per process and can be saved with ``state_dict()``.
- ``Ensemble``: the mean of several rewards (a ``WeightedSum`` with weights 1/n).
- ``Pairwise``: turns a scorer into within-group win rates (Pref-GRPO style): images with the same prompt (or
  the same ``metadata[group_key]``) form a group, and each image's reward is the fraction of the other group
  members it beats, ties (within ``tie_eps``) counting 1/2; a group of one gets 0.5.
All return ``"reward"`` plus every component's own reward under the component's name and its other outputs
as ``"{name}/{key}"``.

``build_rewards(spec)``:
- shorthand ``{"pickscore": 1.0, "aesthetic": 0.5}`` (name -> weight), a list of names, or one name;
- long form ``{"pickscore": {"weight": 1.0, "path": "...", "device": "cuda"}}``: ``weight`` (default 1),
  ``reward`` (the registered name when the key is only a label, e.g. two clipscores), ``pairwise: true``
  (wrap in ``Pairwise``) and every other key is a constructor option of that reward.
Unknown names, bad weights and bad options fail before any model is loaded, with one-line ``RewardError``s.
A single reward with weight 1 (no normalisation) is returned as it is, with no wrapper.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import torch

from .base import REGISTRY, Reward, RewardError, build_reward, known_rewards, register, register_import_path

_NO_CHUNK = sys.maxsize  # combinators pass whole batches on; their components chunk for themselves


class RunningStats:
    """Running mean/variance of a scalar stream: Welford (``momentum=None``) or EMA."""

    def __init__(self, momentum: float | None = None, eps: float = 1e-6):
        if momentum is not None and not 0 < momentum < 1:
            raise RewardError(f"normalisation momentum must be in (0, 1), got {momentum!r}")
        self.momentum, self.eps = momentum, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def var(self) -> float:
        if self.momentum is not None:
            return self.m2
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), self.eps) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten().cpu()
        n = len(v)
        if not n:
            return
        bm, bm2 = float(v.mean()), float(((v - v.mean()) ** 2).sum())
        if self.momentum is not None:  # EMA of mean and (population) variance, mixing old and batch moments
            bv = bm2 / n
            if self.count == 0:
                self.mean, self.m2 = bm, bv
            else:
                m, delta = self.momentum, bm - self.mean
                self.mean += (1 - m) * delta
                self.m2 = m * (self.m2 + (1 - m) * delta * delta) + (1 - m) * bv
            self.count += n
            return
        # Welford / Chan: merge the batch's (count, mean, M2) into the running ones
        delta, total = bm - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += bm2 + delta * delta * self.count * n / total
        self.count = total

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _merge_outputs(out: dict, name: str, res: dict) -> None:
    out[name] = res["reward"]
    for k, v in res.items():
        if k != "reward":
            out[f"{name}/{k}"] = v


class WeightedSum(Reward):
    """``sum_i w_i * r_i`` over named rewards; ``normalize=True`` z-scores each ``r_i`` with running stats."""

    name = "weighted_sum"

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None,
                 normalize: bool = False, momentum: float | None = None):
        if not rewards:
            raise RewardError("a combined reward needs at least one component")
        super().__init__(device=next(iter(rewards.values())).device, batch_size=_NO_CHUNK)
        self.rewards = dict(rewards)
        weights = dict(weights) if weights is not None else {n: 1.0 for n in self.rewards}
        if set(weights) != set(self.rewards):
            raise RewardError(f"weights {sorted(weights)} do not match rewards {sorted(self.rewards)}")
        for n, w in weights.items():
            check_weight(n, w)
        self.weights = {n: float(weights[n]) for n in self.rewards}
        self.normalize = normalize
        self.stats = {n: RunningStats(momentum) for n in self.rewards} if normalize else {}
        self.differentiable = all(r.differentiable for r in self.rewards.values())
        self.group_scope = any(r.group_scope for r in self.rewards.values())
        self.needs_images = any(getattr(r, "needs_images", False) for r in self.rewards.values())
        self.needs_metadata = any(r.needs_metadata for r in self.rewards.values())
        sizes = {r.size for r in self.rewards.values() if r.size is not None}
        self.size = sizes.pop() if len(sizes) == 1 else None

    def score(self, images, prompts, metadata):
        out: dict[str, torch.Tensor] = {}
        total = None
        for n, r in self.rewards.items():
            res = r(images, prompts, metadata)
            _merge_outputs(out, n, res)
            v = res["reward"]
            if self.normalize:
                self.stats[n].update(v)
                v = self.stats[n].normalize(v)
                out[f"{n}/normalized"] = v
            term = self.weights[n] * v
            total = term if total is None else total + term
        out["reward"] = total
        return out

    def finalize(self, outputs, groups, **batch):
        """Finish the group-scope components on the gathered batch and recombine the weighted sum."""
        if not self.group_scope:
            return outputs
        out, total = dict(outputs), None
        for n, r in self.rewards.items():
            if r.group_scope:
                sub = {k[len(n) + 1:]: v for k, v in out.items() if k.startswith(f"{n}/")}
                done = r.finalize(dict(sub, reward=out[n]), groups, **(batch if getattr(r, "needs_images", False)
                                                                       else {}))
                _merge_outputs(out, n, done)
            v = out[n]
            if self.normalize:
                v = self.stats[n].normalize(v)
                out[f"{n}/normalized"] = v
            total = self.weights[n] * v if total is None else total + self.weights[n] * v
        out["reward"] = total
        return out

    def state_dict(self) -> dict:
        return {n: s.state_dict() for n, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, s in state.items():
            self.stats[n].load_state_dict(s)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:g}" for n, w in self.weights.items())
        return f"{type(self).__name__}({parts}{', normalize' if self.normalize else ''})"


class Ensemble(WeightedSum):
    """The mean of several rewards."""

    name = "ensemble"

    def __init__(self, rewards: Mapping[str, Reward] | Sequence[Reward]):
        if not isinstance(rewards, Mapping):
            names = [r.name for r in rewards]
            if len(set(names)) != len(names):
                raise RewardError(f"ensemble components share names {names}; pass a mapping name -> reward")
            rewards = dict(zip(names, rewards))
        super().__init__(rewards, {n: 1.0 / max(len(rewards), 1) for n in rewards})


def win_rates(scores: torch.Tensor, groups: Sequence, tie_eps: float = 0.0) -> torch.Tensor:
    """Fraction of its group (same key in ``groups``) each score beats; ties (|diff| <= tie_eps) count 1/2."""
    s = scores.detach().float().cpu()
    out = torch.full_like(s, 0.5)
    index: dict = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for members in index.values():
        if len(members) < 2:
            continue
        v = s[members]
        d = v[:, None] - v[None, :]
        win = (d > tie_eps).float() + 0.5 * (d.abs() <= tie_eps).float()
        win.fill_diagonal_(0)
        out[members] = win.sum(1) / (len(members) - 1)
    return out.to(scores.device)


class Pairwise(Reward):
    """Within-group win rates of a scorer (for Pref-GRPO). Called on its own, groups are the same prompt, or the
    same ``metadata[group_key]``, within the batch it is given; in training it has group scope: the trainer gathers
    the scorer's raw scores of the whole iteration from every process and ``finalize`` computes the win rates
    keyed by group id, so a group split over rollout chunks or processes is whole and two groups of one prompt
    stay apart. Not differentiable (ranks)."""

    differentiable = False
    group_scope = True

    def __init__(self, scorer: Reward, group_key: str | None = None, tie_eps: float = 0.0):
        super().__init__(device=scorer.device, batch_size=_NO_CHUNK)
        self.scorer, self.group_key, self.tie_eps = scorer, group_key, float(tie_eps)
        self.name = f"pairwise_{scorer.name}"
        self.needs_metadata = scorer.needs_metadata or group_key is not None
        self.size = scorer.size

    def score(self, images, prompts, metadata):
        res = self.scorer(images, prompts, metadata)
        if self.group_key is None:
            groups = list(prompts)
        else:
            missing = [i for i, m in enumerate(metadata) if self.group_key not in m]
            if missing:
                raise RewardError(f"pairwise reward: metadata record {missing[0]} has no {self.group_key!r} key")
            groups = [m[self.group_key] for m in metadata]
        out: dict[str, torch.Tensor] = {}
        _merge_outputs(out, self.scorer.name, res)
        out["reward"] = win_rates(res["reward"], groups, self.tie_eps)
        return out

    def finalize(self, outputs, groups):
        out = dict(outputs)
        out["reward"] = win_rates(out[self.scorer.name], groups.tolist(), self.tie_eps)
        return out


class PairwiseJudge(Reward):
    """A model that compares two images of one prompt (a VLM asked "which matches better", a preference model
    with two image inputs): subclasses implement ``prefer(images_a, images_b, prompts, metadata) -> P(a > b)``
    in [0, 1]. As a reward it gives each image its win rate within its group over all pairs (``hard``: a win when
    P > 1/2, a tie 1/2 at P = 1/2; soft: the mean of P). Group scope, and its ``finalize`` needs the images
    themselves (``needs_images``): the trainer gathers the iteration's images, prompts and metadata from every
    process, and groups are keyed by group id. Each unordered pair is judged once: P(b > a) = 1 - P(a > b)."""

    group_scope = True
    needs_images = True
    differentiable = False

    def __init__(self, hard: bool = True, device="cpu", batch_size: int = _NO_CHUNK):
        super().__init__(device=device, batch_size=batch_size)
        self.hard = hard

    def prefer(self, images_a, images_b, prompts, metadata) -> torch.Tensor:
        raise NotImplementedError

    def group_win_rates(self, images, prompts, metadata, groups: Sequence) -> torch.Tensor:
        index: dict = {}
        for i, g in enumerate(groups):
            index.setdefault(g, []).append(i)
        ia, ib = [], []
        for members in index.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    ia.append(members[x])
                    ib.append(members[y])
        out = torch.full((len(groups),), 0.5)
        if not ia:
            return out
        a, b = torch.tensor(ia), torch.tensor(ib)
        meta = None if metadata is None else [metadata[i] for i in ia]
        p = self.prefer(images[a], images[b], [prompts[i] for i in ia], meta).detach().float().cpu().clamp(0, 1)
        if self.hard:
            p = (p > 0.5).float() + 0.5 * (p == 0.5).float()
        wins = torch.zeros(len(groups)).index_add_(0, a, p).index_add_(0, b, 1 - p)
        size = torch.tensor([len(index[g]) for g in groups], dtype=torch.float32)
        return torch.where(size > 1, wins / (size - 1).clamp_min(1), out)

    def score(self, images, prompts, metadata):
        return {"reward": self.group_win_rates(images, list(prompts), metadata, list(prompts))}

    def finalize(self, outputs, groups, images=None, prompts=None, metadata=None):
        if images is None:
            raise RewardError(f"{self.name}: a pairwise judge needs the group's images to finish its win rates")
        return dict(outputs, reward=self.group_win_rates(images, list(prompts), metadata, groups.tolist()).to(
            outputs["reward"].device))


class BradleyTerryJudge(PairwiseJudge):
    """A pointwise scorer as a pairwise judge: P(a > b) = sigmoid((s_a - s_b) / temperature) (the cheap stand-in
    for a true pairwise model; Pref-GRPO's ``preference: soft`` does the same on the rewards directly)."""

    def __init__(self, scorer: Reward, temperature: float = 1.0, hard: bool = True):
        super().__init__(hard=hard, device=scorer.device)
        if not temperature > 0:
            raise RewardError(f"bradley_terry: temperature must be > 0, got {temperature!r}")
        self.scorer, self.temperature = scorer, float(temperature)
        self.name = f"bt_{scorer.name}"
        self.needs_metadata, self.size = scorer.needs_metadata, scorer.size

    def prefer(self, images_a, images_b, prompts, metadata):
        sa = self.scorer(images_a, prompts, metadata)["reward"].float()
        sb = self.scorer(images_b, prompts, metadata)["reward"].float()
        return torch.sigmoid((sa - sb) / self.temperature)


# ------------------------------------------------------------------------------------------------- config

def check_weight(name: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise RewardError(f"reward {name!r}: weight must be a finite number, got {w!r}")
    return float(w)


def _entries(spec) -> list[tuple[str, dict]]:
    if isinstance(spec, str):
        spec = {spec: 1.0}
    elif isinstance(spec, (list, tuple)):
        if not all(isinstance(s, str) for s in spec):
            raise RewardError(f"a reward list must hold reward names, got {spec!r}")
        spec = dict.fromkeys(spec, 1.0)
    if not isinstance(spec, Mapping):
        raise RewardError(f"reward spec must be a name, a list of names or a mapping, got {type(spec).__name__}")
    if not spec:
        raise RewardError("empty reward spec: name at least one reward")
    out = []
    for label, entry in spec.items():
        if isinstance(entry, Mapping):
            entry = dict(entry)
        else:  # a bare weight (None = 1); anything else fails the weight check, which names the reward
            entry = {"weight": 1.0 if entry is None else entry}
        out.append((str(label), entry))
    return out


def build_rewards(spec, normalize: bool = False, momentum: float | None = None, device: str | None = None) -> Reward:
    """Build the reward a config asks for (see the module docstring for the syntax). ``device`` is the default
    for every reward that takes one; ``normalize``/``momentum`` configure ``WeightedSum`` normalisation."""
    entries = _entries(spec)
    known = known_rewards()
    plans = []
    for label, entry in entries:  # validate everything before loading any model
        name = entry.pop("reward", label)
        register_import_path(name)
        if name not in REGISTRY:
            raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(known)}")
        weight = check_weight(label, entry.pop("weight", 1.0))
        pairwise = entry.pop("pairwise", False)
        pw_opts = {k: entry.pop(k) for k in ("group_key", "tie_eps") if k in entry}
        if pw_opts and not pairwise:
            raise RewardError(f"reward {label!r}: {', '.join(pw_opts)} only apply with pairwise: true")
        if device is not None and "device" not in entry and "device" in _params(name):
            entry["device"] = device
        bad = [k for k in entry if k not in _params(name)] if not _takes_kwargs(name) else []
        if bad:
            raise RewardError(f"reward {label!r} ({name}) has no option(s) {', '.join(map(repr, bad))}; "
                              f"options: {', '.join(p for p in _params(name))}")
        plans.append((label, name, weight, bool(pairwise), pw_opts, entry))
    rewards, weights = {}, {}
    for label, name, weight, pairwise, pw_opts, opts in plans:
        r = build_reward(name, **opts)
        rewards[label] = Pairwise(r, **pw_opts) if pairwise else r
        weights[label] = weight
    if len(rewards) == 1 and not normalize and next(iter(weights.values())) == 1.0:
        return next(iter(rewards.values()))
    return WeightedSum(rewards, weights, normalize=normalize, momentum=momentum)


def _params(name: str) -> list[str]:
    import inspect
    return list(inspect.signature(REGISTRY[name]).parameters)


def _takes_kwargs(name: str) -> bool:
    import inspect
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(REGISTRY[name]).parameters.values())


@register("bradley_terry")
def _build_bradley_terry(scorer: str = "shapeworld", temperature: float = 1.0, hard: bool = True,
                         **scorer_options) -> BradleyTerryJudge:
    """``rewards: {bradley_terry: {scorer: shapeclip, temperature: 0.5}}``: a pointwise reward as a pairwise judge
    (win rates within each group; for Pref-GRPO use ``algorithm.preference: given``)."""
    if scorer == "bradley_terry":
        raise RewardError("bradley_terry: the scorer must be a pointwise reward")
    return BradleyTerryJudge(build_reward(scorer, **scorer_options), temperature=temperature, hard=hard)
