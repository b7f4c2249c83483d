"""The algorithm protocol: what an algorithm declares and computes; the trainer does the plumbing around it.

An algorithm is one file under ``flowalign/algorithms/`` holding a config dataclass (the YAML ``algorithm:``
section, ``name`` first) and a class that answers four questions:

- **how to roll out** -- ``rollout_spec()``: SDE on the sample config's stochastic steps with stored log-probs
  (policy-gradient methods), or a plain ODE keeping only the clean samples (forward-process methods); the CFG scale;
  which policy samples ("current", or a named one such as "old");
- **what to train on** -- ``plan(traj, adv, ctx) -> Work``: from the rolled-out batch and its advantages, which
  samples are trained, with any per-sample tensors (noise levels, noises, stored "old" losses) drawn from the
  iteration's generator, and the unit that stays together in a micro-batch;
  ``parts(work)``: the backward passes of one micro-batch (e.g. one per replayed step);
- **the loss** -- ``loss(fwd, work, part) -> (loss, stats)``: makes its own forwards through ``fwd`` (the adapter
  with the trained module and CFG-gradient mode bound, and the named policies), small pure functions underneath;
- **what happens after a step** -- ``after_step(adapter)`` after each optimizer step, ``end_iteration(adapter, it)``.

The trainer never branches on which algorithm runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from flowalign.rollout import Trajectory


@dataclass
class RolloutSpec:
    stochastic: bool           # SDE on the sample config's steps, log-probs stored; False: ODE, clean samples only
    policy: str = "current"    # which policy samples: the trained one, or a named policy ("old")
    branch_steps: list | None = None  # with sample.branching: the steps a group may branch at (default: all SDE)
    completions: tuple = ()    # G2RPO: extra ODE completions of each trajectory from the step after its last
                               # stochastic one, with every g-th remaining step, each scored as "reward@g"


@dataclass
class Work:
    """The training work of one iteration (this process's samples): the trajectories, their advantages, per-sample
    tensors an algorithm drew for them, and which of them are trained."""
    traj: Trajectory
    adv: torch.Tensor                                    # (B,)
    keep: torch.Tensor                                   # indices of the trained samples
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample tensors, first dim B
    unit: int = 1                                        # consecutive kept samples that stay in one micro-batch
    info: dict[str, Any] = field(default_factory=dict)   # per-iteration choices (steps, weights), shared by all

    def __len__(self) -> int:
        return len(self.traj)

    def index(self, idx: torch.Tensor) -> "Work":
        idx = torch.as_tensor(idx).long().view(-1)
        return Work(self.traj.index(idx), self.adv[idx.to(self.adv.device)], torch.arange(len(idx)),
                    {k: v[idx.to(v.device)] for k, v in self.extra.items()}, self.unit, self.info)


def nonzero_advantages(adv: torch.Tensor, world: int) -> torch.Tensor:
    """The samples worth training when a zero advantage carries no signal: those with A != 0, on one process.
    With several processes every one must run the same backward passes, so all samples are kept."""
    return (adv != 0).nonzero().view(-1).cpu() if world == 1 else torch.arange(len(adv))


class Forward:
    """What a loss may call: the trained policy's prediction / step (through the trainer's wrapped module, with the
    configured CFG-gradient mode), and the named policies' (under no_grad)."""

    def __init__(self, adapter, module=None, cfg_grad: str = "both"):
        self.adapter, self.module, self.cfg_grad = adapter, module, cfg_grad

    def predict(self, x, sigma, cond, guidance: float = 1.0, policy: str | None = None) -> torch.Tensor:
        if policy is None:
            return self.adapter.predict(x, sigma, cond, guidance, module=self.module, cfg_grad=self.cfg_grad)
        with torch.no_grad(), self.adapter.policy(policy):
            return self.adapter.predict(x, sigma, cond, guidance)

    def step(self, x, sigmas, i, cond, guidance, noise_level, policy: str | None = None, **kw):
        if policy is None:
            return self.adapter.step(x, sigmas, i, cond, guidance, noise_level, module=self.module,
                                     cfg_grad=self.cfg_grad, **kw)
        with torch.no_grad(), self.adapter.policy(policy):
            return self.adapter.step(x, sigmas, i, cond, guidance, noise_level, **kw)


@dataclass
class Context:
    """What the trainer tells an algorithm about the run (read-only)."""
    sample: Any                 # the sample config section
    sigmas: torch.Tensor        # the rollout schedule (T+1,)
    sde_mask: torch.Tensor      # (T,) the sample config's stochastic steps
    world: int                  # number of processes (every process must run the same backward passes)
    seed: int


class Algorithm:
    """Base class: defaults for the optional parts of the protocol. Subclasses set ``name`` and ``Config``."""
    name: ClassVar[str]
    Config: ClassVar[type]
    stochastic: ClassVar[bool]   # rolls out with the SDE (log-probs stored), or with the ODE

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    # what the trainer must provide
    def policies(self) -> tuple[str, ...]:
        """Named policies the adapter must keep ("reference", "old", "ema", ...)."""
        return ()

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic=self.stochastic)

    # per iteration
    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        from .grpo import group_advantages

        return group_advantages(rewards, groups, getattr(self.cfg, "global_std", False),
                                adv_clip=getattr(self.cfg, "adv_clip", None))

    def advantages_and_stats(self, rewards: torch.Tensor, groups: torch.Tensor, keys: list | None = None
                             ) -> tuple[torch.Tensor, dict]:
        """What the trainer calls (on every process's gathered rewards, group ids and prompt texts ``keys``): the
        advantages, and any per-iteration figures the algorithm wants logged beside them."""
        return self.advantages(rewards, groups), {}

    def plan(self, traj: Trajectory, adv: torch.Tensor, it: int, gen: torch.Generator) -> Work:
        raise NotImplementedError

    def parts(self, work: Work) -> list:
        return [None]

    def loss(self, fwd: Forward, work: Work, part) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, adapter) -> None:
        pass

    def end_iteration(self, adapter, it: int) -> None:
        pass
