"""The trainer: wires adapter, rollout, rewards and algorithm together; accelerate owns devices and processes.

Per iteration: draw prompts (the same list on every process), repeat each ``group_size`` times, shuffle, give each
process its slice -> rollout as the algorithm asks (SDE with log-probs, or ODE; which policy samples) -> rewards ->
gather rewards and group ids from all processes -> per-prompt group advantages -> each process takes its slice ->
the algorithm's plan (which samples, steps or noise levels) -> micro-batches of its loss, ``inner_epochs`` passes,
``updates_per_iter`` optimizer steps per pass -> the algorithm's hooks, EMA, logs, checkpoints. The trainer never
branches on which algorithm runs (``flowalign/algorithms/base.py`` is the protocol).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from flowalign import checkpoint as ckpt
from flowalign import seeding
from flowalign.algorithms import ALGORITHMS, Context, Forward
from flowalign.config import Config, ConfigError, Derived
from flowalign.rollout import Trajectory, complete, rollout, sde_mask


class TrainingError(RuntimeError):
    pass


def resolve_model_path(path: str) -> str:
    if path == "shapeworld":
        from flowalign.shapeworld import MODEL_DIR
        return str(MODEL_DIR)
    return path


def lr_factor(t, it: int) -> float:
    """The learning rate of iteration ``it`` (0-based) as a fraction of ``train.lr``: a linear warm-up over
    ``train.lr_warmup`` iterations, then ``train.lr_schedule``: constant, or cosine / linear from 1 at the end of the
    warm-up to ``train.lr_final`` at the last iteration."""
    if t.lr_warmup > 0 and it < t.lr_warmup:
        return (it + 1) / t.lr_warmup
    if t.lr_schedule == "constant":
        return 1.0
    span = max(1, t.iterations - 1 - t.lr_warmup)
    p = min(1.0, max(0.0, (it - t.lr_warmup) / span))
    shape = 0.5 * (1 + math.cos(math.pi * p)) if t.lr_schedule == "cosine" else 1 - p
    return t.lr_final + (1 - t.lr_final) * shape


class Trainer:
    def __init__(self, cfg: Config, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from flowalign.eval.benchmark import resolve_prompts, subsample
        from flowalign.eval.geneval import load_metadata
        from flowalign.pipelines.base import load_adapter
        from flowalign.rewards.combine import build_rewards

        self.cfg = cfg
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.d = Derived.of(cfg, self.acc.num_processes)
        set_seed(cfg.run.seed + self.acc.process_index)
        self.out = Path(cfg.run.output_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"run.output_dir: {self.out} is an existing file, not a directory")
        latest = ckpt.latest_checkpoint(self.out / "checkpoints") if cfg.run.resume else None
        if (self.out / "metrics.jsonl").is_file() and latest is None:
            raise ConfigError(f"run.output_dir: {self.out} already holds a run (metrics.jsonl) with nothing to resume "
                              f"{'(run.resume is false)' if not cfg.run.resume else 'from'}; use a new directory, "
                              f"or delete that one")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
        self.adapter = load_adapter(resolve_model_path(cfg.model.path), cfg.model.family, dtype=dtype,
                                    device=self.acc.device, resolution=cfg.model.resolution)
        kernels = getattr(self.adapter, "kernels", ("sde", "cps"))  # what the family's step implements
        if cfg.sample.kernel not in kernels:
            raise ConfigError(f"sample.kernel: {cfg.sample.kernel!r} is not implemented by the {self.adapter.family} "
                              f"adapter; use one of {', '.join(kernels)}")
        if cfg.model.resolution:
            try:
                self.adapter.latent_shape()
            except ValueError as e:
                raise ConfigError(f"model.resolution: {e}") from None
        self.reward = build_rewards(cfg.rewards, device=str(self.acc.device))
        self.train_meta = load_metadata(resolve_prompts(cfg.data.train))
        self.by_task: dict[str, list[int]] = {}
        for j, m in enumerate(self.train_meta):
            self.by_task.setdefault(m.get("tag", "prompt"), []).append(j)
        for key, per_task in (("data.task_weights", cfg.data.task_weights),
                              ("sample.task_group_sizes", cfg.sample.task_group_sizes)):
            if per_task and set(per_task) - set(self.by_task):
                raise ConfigError(f"{key}: no training prompts with tag(s) {sorted(set(per_task) - set(self.by_task))}"
                                  f"; the training set has {sorted(self.by_task)}")
        self.eval_sets = {"test": subsample(load_metadata(resolve_prompts(cfg.data.eval)), cfg.eval.n_per_task)}
        if cfg.data.eval_unseen:
            self.eval_sets["unseen"] = subsample(load_metadata(resolve_prompts(cfg.data.eval_unseen)), cfg.eval.n_per_task)
        self.sigmas = self.adapter.schedule(cfg.sample.num_steps).to(self.acc.device)
        self.mask = sde_mask(cfg.sample.num_steps, cfg.sample.sde_steps)
        self.algo = ALGORITHMS[cfg.algorithm.name](cfg.algorithm, Context(
            sample=cfg.sample, sigmas=self.sigmas.cpu(), sde_mask=self.mask, world=self.d.world, seed=cfg.run.seed))
        self.spec = self.algo.rollout_spec()
        if self.spec.completions and self.reward.group_scope:
            raise ConfigError("algorithm.granularities: the extra completions are scored one by one, which a "
                              "group-scope reward (pairwise, frechet, vendi) cannot do; use a pointwise reward")
        if not self.spec.stochastic:
            self.mask = torch.zeros_like(self.mask)
        lora = cfg.model.lora
        params = (self.adapter.add_lora(lora.rank, lora.alpha, init=lora.init if lora.init != "default" else True)
                  if lora.enabled else self.adapter.full_finetune())
        for name in self.algo.policies():
            self.adapter.add_policy(name)
        if cfg.model.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        self.params = params
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                weight_decay=cfg.train.weight_decay)
        # self.model is the (possibly DDP-wrapped) denoiser (transformer or UNet), for the training forwards only
        # (rollout and eval run the plain module: no gradient, no collective calls)
        self.model, self.opt = self.acc.prepare(self.adapter.denoiser, opt)
        self.ema = [p.detach().clone() for p in params] if cfg.train.ema_decay > 0 else None
        self.fwd = Forward(self.adapter, module=self.model, cfg_grad=cfg.train.cfg_grad)
        self.iteration, self.nan_streak, self.nan_skipped = 0, 0, 0
        self.evals: list[dict] = []
        self.is_main = self.acc.is_main_process
        if latest is not None:
            self.load(latest)

    # ---------------------------------------------------------------------------------------- data
    def prompts_for(self, it: int) -> tuple[list[int], list[dict], list[int]]:
        """This process's slice of the iteration's samples (the full list is identical on every process): group id,
        prompt metadata and member index within the group, per sample."""
        rng = seeding.rng(self.cfg.run.seed, "prompts", it)
        by_task = self.by_task
        tasks = sorted(by_task)
        tw = self.cfg.data.task_weights

        def task() -> str:
            return rng.choices(tasks, [float(tw.get(t, 0.0)) for t in tasks])[0] if tw else rng.choice(tasks)

        # draw prompts until the iteration's images are filled: prompts_per_iter groups of group_size, unless
        # sample.task_group_sizes gives a task its own size
        s = self.cfg.sample
        sizes = s.task_group_sizes or {}
        chosen, left = [], s.prompts_per_iter * s.group_size
        while left:
            t = task()
            n = min(sizes.get(t, s.group_size), left)
            if left - n == 1:  # never leave one image over: a group needs two
                n += 1
            chosen.append((rng.choice(by_task[t]), n))
            left -= n
        self.n_groups = len(chosen)
        ids = [(g, pid, m) for g, (pid, n) in enumerate(chosen) for m in range(n)]
        rng.shuffle(ids)
        lo = self.acc.process_index * self.d.samples_per_process
        mine = ids[lo: lo + self.d.samples_per_process]
        return [g for g, _, _ in mine], [self.train_meta[pid] for _, pid, _ in mine], [m for _, _, m in mine]

    # ---------------------------------------------------------------------------------------- one iteration
    @torch.no_grad()
    def collect(self, it: int):
        """Roll out this process's samples. Every draw comes from a named stream keyed by what the sample is
        (iteration, group, member), so a sample is the same whichever process or rollout chunk holds it."""
        groups, metas, members = self.prompts_for(it)
        s, seed = self.cfg.sample, self.cfg.run.seed
        trajs, rewards = [], []
        shape = self.adapter.latent_shape()
        if s.shared_noise:  # one x_T per prompt group: a group split across ranks still shares it
            gens = [seeding.generator(seed, "x_T/group", it, g) for g in groups]
        else:
            gens = [seeding.generator(seed, "x_T", it, g, m) for g, m in zip(groups, members)]
        x_T = self.adapter.init_noise(len(metas), gens)
        noises = None
        if self.spec.stochastic:  # the SDE noise of every step, per sample (B, T, C, H, W), drawn on the CPU
            if s.antithetic:  # member 2k+1 of a group gets minus the SDE noise of member 2k
                noises = torch.stack([torch.randn((s.num_steps, *shape), generator=seeding.generator(
                    seed, "sde/pair", it, g, m // 2)) * (1 - 2 * (m % 2)) for g, m in zip(groups, members)])
            else:
                noises = torch.stack([torch.randn((s.num_steps, *shape), generator=seeding.generator(
                    seed, "sde", it, g, m)) for g, m in zip(groups, members)])
        mask = self.mask
        if s.branching:  # one stochastic step per group, the same draw on every process
            rng = seeding.rng(seed, "branch", it)
            pool = self.spec.branch_steps or self.mask.nonzero().view(-1).tolist()
            at = [rng.choice(pool) for _ in range(self.n_groups)]
            mask = torch.zeros(len(metas), s.num_steps, dtype=torch.bool)
            mask[torch.arange(len(metas)), torch.tensor([at[g] for g in groups], dtype=torch.long)] = True

        def sampling():  # the policy the algorithm samples with
            return self.adapter.policy(self.spec.policy) if self.spec.policy != "current" else contextlib.nullcontext()

        noise_level = s.noise_level if self.spec.stochastic else 0.0
        for k in range(0, len(metas), s.batch_size):
            mb = metas[k:k + s.batch_size]
            prompts = [m["prompt"] for m in mb]
            cond = self.adapter.encode(prompts, negative="" if s.guidance > 1 else None)
            with sampling():
                tr = rollout(self.adapter, cond, self.sigmas, s.guidance, noise_level,
                             mask[k:k + s.batch_size] if mask.ndim == 2 else mask, x=x_T[k:k + s.batch_size],
                             prompts=prompts, metadata=mb, kernel=s.kernel, noise_block=s.noise_block,
                             noises=None if noises is None else noises[k:k + s.batch_size])
            try:
                out = self.reward(tr.images, prompts, mb)
                for g in self.spec.completions:  # G2RPO: the same trajectories completed at coarser granularities
                    out[f"reward@{g}"] = self.reward(complete(self.adapter, tr, g), prompts, mb)["reward"]
                rewards.append(out)
            except Exception as e:  # a reward's own failure: one line, and (under torchrun) every rank ends
                raise TrainingError(f"reward failed at iteration {it + 1} on process {self.acc.process_index}: "
                                    f"{type(e).__name__}: {e}") from e
            trajs.append(tr)
        traj = Trajectory.cat(trajs)
        traj.groups = torch.tensor(groups, dtype=torch.long)
        r = {k: torch.cat([x[k] for x in rewards]) for k in rewards[0]}
        return traj, r, torch.tensor(groups, device=self.acc.device)

    def group_rewards(self, rew: dict[str, torch.Tensor], groups: torch.Tensor, traj: Trajectory | None = None
                      ) -> dict[str, torch.Tensor]:
        """Rewards of group scope (pairwise win rates) are finished here, after every process's raw scores of the
        iteration are gathered, keyed by group id: whole groups, and two groups of one prompt stay apart."""
        if not self.reward.group_scope:
            return rew
        all_g = self.acc.gather(groups)
        batch = {}
        if getattr(self.reward, "needs_images", False):  # a pairwise judge compares the images themselves
            from accelerate.utils import gather_object

            many = self.d.world > 1
            batch = {"images": self.acc.gather(traj.images.to(self.acc.device)).cpu(),
                     "prompts": gather_object(list(traj.prompts)) if many else list(traj.prompts),
                     "metadata": gather_object(list(traj.metadata)) if many else list(traj.metadata)}
        full = self.reward.finalize({k: self.acc.gather(v.to(self.acc.device).float()) for k, v in rew.items()}, all_g,
                                    **batch)
        lo = self.acc.process_index * self.d.samples_per_process
        return {k: v[lo: lo + self.d.samples_per_process] for k, v in full.items()}

    def advantages(self, reward: torch.Tensor, groups: torch.Tensor, prompts: list[str] | None = None
                   ) -> tuple[torch.Tensor, dict]:
        all_r = self.acc.gather(reward.to(self.acc.device).float())
        all_g = self.acc.gather(groups)
        keys = None
        if prompts is not None:
            from accelerate.utils import gather_object

            keys = gather_object(list(prompts)) if self.d.world > 1 else list(prompts)
        adv, algo_stats = self.algo.advantages_and_stats(all_r, all_g, keys=keys)
        all_r = all_r[:, 0] if all_r.ndim == 2 else all_r  # the statistics are of the reward itself
        lo = self.acc.process_index * self.d.samples_per_process
        gstd = torch.stack([all_r[all_g == g].std(unbiased=False) for g in torch.unique(all_g)])
        # "illusory advantages" (Pref-GRPO): groups whose rewards barely differ (std under a tenth of the batch's)
        # still get advantages of size 1 after group normalisation
        tiny = (gstd > 1e-6) & (gstd < 0.1 * all_r.std(unbiased=False))
        stats = {"reward_mean": all_r.mean().item(), "reward_std": all_r.std().item(), "rewards_gathered": len(all_r),
                 "zero_std_frac": (gstd < 1e-6).float().mean().item(), "illusory_frac": tiny.float().mean().item()}
        stats.update(algo_stats)
        return adv[lo: lo + self.d.samples_per_process], stats

    @staticmethod
    def branch_stats(reward: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per branching step: the mean within-group reward std of the groups branched there (how much that step's
        noise changes the outcome; this process's groups)."""
        at = mask.float().argmax(1)
        out: dict[str, list[float]] = {}
        for g in torch.unique(groups):
            m = (groups == g).cpu()
            out.setdefault(f"branch_std/step{int(at[m][0])}", []).append(float(reward[m].float().std(unbiased=False)))
        return {k: float(np.mean(v)) for k, v in sorted(out.items())}

    def train_on(self, traj: Trajectory, adv: torch.Tensor, it: int) -> dict:
        rank = self.acc.process_index
        work = self.algo.plan(traj, adv, it, seeding.generator(self.cfg.run.seed, "plan", it, rank))
        gen = seeding.generator(self.cfg.run.seed, "shuffle", it, rank)
        n = len(work.keep)
        if n == 0:
            return {"trained_frac": 0.0}
        stats: dict[str, list[float]] = {}
        lr = self.cfg.train.lr * lr_factor(self.cfg.train, it)
        for group in self.opt.param_groups:  # a function of the iteration alone: a resumed run gets the same lr
            group["lr"] = lr
        self._train_passes(work, stats, gen)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["lr"] = lr
        out["trained_frac"] = n / len(traj)
        worst = [k for k in ("ratio_dev", "onpolicy_ratio_dev") if k in stats]
        for key in worst:
            out[key] = float(np.max(stats[key]))
        if self.d.world > 1:  # every rank ran the same parts: log the mean over ranks (the max of the deviations)
            keys = sorted(out)
            vals = self.acc.gather(torch.tensor([[out[k] for k in keys]], device=self.acc.device, dtype=torch.float64))
            out = {k: float(vals[:, j].max() if k in worst else vals[:, j].mean()) for j, k in enumerate(keys)}
        return out

    def _minibatches(self, keep: torch.Tensor, unit: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Shuffle the kept samples (whole units of ``unit`` consecutive ones: a pair, a group) into mini-batches."""
        t = self.cfg.train
        if unit == 1:
            perm = keep[torch.randperm(len(keep), generator=gen)]
        else:
            units = keep.view(-1, unit)
            perm = units[torch.randperm(len(units), generator=gen)].reshape(-1)
        per = max(unit, t.batch_size - t.batch_size % unit)
        return list(perm.split(per))

    def _train_passes(self, work, stats: dict, gen: torch.Generator):
        t = self.cfg.train
        stepped = False
        for _ in range(t.inner_epochs):
            batches = self._minibatches(work.keep, work.unit, gen)
            # updates_per_iter optimizer steps per pass, each over its share of the mini-batches; every loss is a
            # mean over its samples, so a mini-batch counts by its number of samples (the last may be short, and
            # the zero-advantage filter may have left fewer mini-batches than the config's arithmetic assumes)
            n_up = min(t.updates_per_iter, len(batches))
            chunks = [batches[i * len(batches) // n_up:(i + 1) * len(batches) // n_up] for i in range(n_up)]
            for chunk in chunks:
                total = sum(len(b) for b in chunk)
                even = len({len(b) for b in chunk}) == 1
                for b, idx in enumerate(chunk):
                    mb = work.index(idx)
                    parts = self.algo.parts(mb)
                    for k, part in enumerate(parts):
                        # gradients are all-reduced once per optimizer step: at the last backward before it
                        last = b == len(chunk) - 1 and k == len(parts) - 1
                        with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                            loss, st = self.algo.loss(self.fwd, mb, part)
                            self.acc.backward(loss / len(chunk) if even else loss * (len(idx) / total))
                        for key, v in st.items():
                            stats.setdefault(key, []).append(v)
                        if not stepped and "ratio_dev" in st:  # before the first optimizer step the ratio is 1
                            stats.setdefault("onpolicy_ratio_dev", []).append(st["ratio_dev"])
                stepped = True
                gn = self.acc.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm > 0 else None
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if gn is not None:
                    stats.setdefault("grad_norm", []).append(float(gn))
                self.algo.after_step(self.adapter)
                self.update_ema()

    def update_ema(self):
        if self.ema is None:
            return
        decay = min(self.cfg.train.ema_decay, (1 + self.iteration) / (10 + self.iteration))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    # ---------------------------------------------------------------------------------------- eval / io
    def evaluate(self, tag: str) -> dict:
        """Judge the current weights (EMA when kept) on the held-out prompts: the test set at every CFG scale of
        ``eval.guidance`` (a number or a grid), the model headlined at its best scale under the headline judge
        (the held-out judge's strict verdict, ``eval.judges.HEADLINE``; the training reward with
        ``eval.judge: reward``), and the other sets (unseen) at that scale. Sample and audit grids per tag."""
        from flowalign.eval.benchmark import evaluate, save_audit_grid, save_grid
        from flowalign.eval.judges import HEADLINE

        res_all = {}
        if self.is_main:
            e = self.cfg.eval
            grid = list(e.guidance) if isinstance(e.guidance, list) else [e.guidance]
            scorer = None if e.judge == "shapeworld" else self.reward_judge

            def headline(res):
                return res["judges"][HEADLINE] if "judges" in res else res

            def run(metas, g):
                return evaluate(self.adapter, metas, e.num_steps, g, e.seed, e.batch_size, scorer=scorer)

            with self.ema_weights():
                tried = {g: run(self.eval_sets["test"], g) for g in grid}
                best = max(grid, key=lambda g: headline(tried[g][0])["overall"])
                for name, metas in self.eval_sets.items():
                    res, images = tried[best] if name == "test" else run(metas, best)
                    h = headline(res)
                    res_all[name] = {"per_task": h["per_task"], "overall": h["overall"],
                                     "se_overall": h.get("se_overall"), "guidance": best,
                                     "judge": HEADLINE if "judges" in res else "reward"}
                    if "judges" in res:
                        res_all[name].update(judges=res["judges"], agreement=res["agreement"])
                    if name == "test":
                        res_all[name]["grid"] = {f"{g:g}": ({j: r["overall"] for j, r in tried[g][0]["judges"].items()}
                                                            if "judges" in tried[g][0] else {"reward": tried[g][0]["overall"]})
                                                 for g in grid}
                        marked = [dict(m, correct=r["correct"]) for m, r in zip(metas, res["per_image"])]
                        save_grid(images, marked, self.out / "samples" / f"{tag}.png")
                        if "judges" in res:
                            save_audit_grid(images, metas, res["per_image"], self.out / "samples" / f"audit_{tag}.png")
            rec = {"tag": tag, "iteration": self.iteration, **res_all}
            self.evals.append({"iteration": self.iteration, "overall": res_all["test"]["overall"], "tag": tag})
            with open(self.out / "evals.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.acc.wait_for_everyone()
        return res_all

    def reward_judge(self, metadata, images) -> list[tuple[bool, float]]:
        """Eval with the training reward: (reward > 0.5 or the reward's own 'correct', reward) per image."""
        out = self.reward(list(images), [m["prompt"] for m in metadata], metadata)
        correct = out.get("correct", out["reward"] > 0.5)
        return [(bool(c), float(r)) for c, r in zip(correct.tolist(), out["reward"].tolist())]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.acc.unwrap_model(self.model)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: p for p in self.params}

    def save(self):
        if self.is_main:
            # named policies that move (NFT's old, AWM's old / ema): a resumed run continues with them
            policies = {n: [t.detach().cpu().clone() for t in self.adapter.policy_tensors(n)]
                        for n in self.algo.policies() if n != "reference"}
            state = {"optimizer": self.opt.state_dict(), "ema": self.ema, "rng": ckpt.rng_state(), "policies": policies,
                     "counters": {"iteration": self.iteration, "nan_skipped": self.nan_skipped,
                                  "nan_streak": self.nan_streak}, "evals": self.evals}
            ckpt.save_checkpoint(self.out / "checkpoints", f"iter_{self.iteration:06d}", self.trainable_state(), state,
                                 {"iteration": self.iteration, "config_hash": self.cfg.hash()})
        self.acc.wait_for_everyone()

    def load(self, directory):
        weights, state, meta = ckpt.load_checkpoint(directory)
        if meta.get("config_hash") != self.cfg.hash():
            raise TrainingError(f"checkpoint {directory} was written by a different config (hash {meta.get('config_hash')}"
                                f" vs {self.cfg.hash()}); use a new run.output_dir or run.resume=false")
        cur = self.trainable_state()
        with torch.no_grad():
            for k, p in cur.items():
                p.copy_(weights[k])
        self.opt.load_state_dict(state["optimizer"])
        self.ema = None if state["ema"] is None else [e.to(p.device) for e, p in zip(state["ema"], self.params)]
        with torch.no_grad():
            for n, tensors in state.get("policies", {}).items():
                for dst, src in zip(self.adapter.policy_tensors(n), tensors):
                    dst.copy_(src.to(dst.device))
        ckpt.set_rng_state(state["rng"])
        c = state["counters"]
        self.iteration, self.nan_skipped, self.nan_streak = c["iteration"], c["nan_skipped"], c["nan_streak"]
        self.evals = state.get("evals", [])

    def reused_base(self) -> dict:
        """The base evaluation of ``eval.base_from`` (a finished run), refused unless what decides the base's
        figures is the same: the model, the evaluation data and every eval setting but ``every`` / ``base_from``."""
        src = Path(self.cfg.eval.base_from)
        cfg_p, base_p = src / "config.json", src / "base_eval.json"
        if not (cfg_p.is_file() and base_p.is_file()):
            raise TrainingError(f"eval.base_from: {src} has no config.json and base_eval.json (a run's directory?)")
        theirs, ours = json.loads(cfg_p.read_text()), self.cfg.to_dict()

        def protocol(d):
            ev = {k: v for k, v in d["eval"].items() if k not in ("every", "base_from")}
            data = {k: v for k, v in d["data"].items() if k != "train" and k != "task_weights"}
            model = {k: v for k, v in d["model"].items() if k in ("path", "family", "resolution", "dtype")}
            return {"eval": ev, "data": data, "model": model}
        a, b = protocol(theirs), protocol(ours)
        if a != b:
            diff = sorted(f"{sec}.{k}" for sec in a for k in set(a[sec]) | set(b[sec])
                          if a[sec].get(k) != b[sec].get(k))
            raise TrainingError(f"eval.base_from: {src} evaluated the base under another protocol "
                                f"(differs in {', '.join(diff)}); evaluate the base again")
        return json.loads(base_p.read_text())  # run() writes it to this run's base_eval.json, as an evaluated base

    # ---------------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        from tqdm import tqdm

        from flowalign.tracking import RunLogger

        self.out.mkdir(parents=True, exist_ok=True)
        log = RunLogger(self.out, enabled=self.is_main)
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(dict(self.cfg.to_dict(), config_hash=self.cfg.hash(),
                                                                  world_size=self.d.world), indent=1))
        base = None
        if self.iteration == 0:
            base = self.reused_base() if self.cfg.eval.base_from else self.evaluate("base")
            if self.is_main:
                (self.out / "base_eval.json").write_text(json.dumps(base, indent=1))
        total = self.cfg.train.iterations
        bar = tqdm(total=total, initial=self.iteration, desc=self.cfg.algorithm.name, disable=not self.is_main,
                   mininterval=2)
        while self.iteration < total:
            t0, c0 = time.time(), time.process_time()
            it = self.iteration
            traj, rew, groups = self.collect(it)
            t_roll = time.time() - t0
            finite = torch.isfinite(rew["reward"]).all().to(self.acc.device).float()
            finite = self.acc.reduce(finite, reduction="mean").item() if self.d.world > 1 else finite.item()
            rec = {"iteration": it + 1, "rollout_s": t_roll}
            if finite < 1:
                self.nan_streak += 1
                self.nan_skipped += 1
                rec.update(skipped="non-finite reward", nan_skipped=self.nan_skipped)
                if self.nan_streak >= self.cfg.train.max_nan_streak:
                    raise TrainingError(f"reward was non-finite (NaN/inf) in {self.nan_streak} iterations in a row; "
                                        f"stopping at iteration {it + 1}")
            else:
                self.nan_streak = 0
                rew = self.group_rewards(rew, groups, traj)
                signal = rew["reward"]
                if self.spec.completions:  # one column per granularity: the algorithm integrates them
                    signal = torch.stack([signal] + [rew[f"reward@{g}"] for g in self.spec.completions], 1)
                adv, st = self.advantages(signal, groups, traj.prompts)
                rec.update(st)
                if traj.sde_mask.ndim == 2:
                    rec.update(self.branch_stats(rew["reward"], groups, traj.sde_mask))
                rec.update(self.train_on(traj, adv, it))
                for key, v in rew.items():  # components of a combined reward, a judge's 'correct', ...
                    if key != "reward" and v.is_floating_point() and v.ndim == 1:
                        rec[f"score/{key}"] = float(v.float().mean())
                tags = [m["tag"] for m in traj.metadata]
                for tg in sorted(set(tags)):
                    rec[f"reward/{tg}"] = float(rew["reward"][[x == tg for x in tags]].mean())
            self.algo.end_iteration(self.adapter, it)
            self.iteration += 1
            rec["iter_s"] = time.time() - t0
            rec["iter_cpu_s"] = time.process_time() - c0  # this process's CPU time: steadier on a shared machine
            log.log(rec)
            bar.update(1)
            if "reward_mean" in rec:
                post = {"r": f"{rec['reward_mean']:.3f}±{rec['reward_std']:.2f}"}
                post.update({k: f"{rec[k]:.2e}" for k in ("kl", "ema_kl") if k in rec})
                post.update({k: f"{rec[k]:.2f}" for k in ("clipfrac",) if k in rec})
                bar.set_postfix(post)
            if self.cfg.eval.every and self.iteration % self.cfg.eval.every == 0 and self.iteration < total:
                self.evaluate(f"iter_{self.iteration:06d}")
            if self.cfg.run.checkpoint_every and self.iteration % self.cfg.run.checkpoint_every == 0:
                self.save()
        bar.close()
        final = self.evaluate("final")
        if self.cfg.run.checkpoint_every == 0 or self.iteration % self.cfg.run.checkpoint_every:
            self.save()
        result = self.finish(base, final, log)
        log.close()
        return result

    def finish(self, base, final, log) -> dict:
        from flowalign import plots
        from flowalign.eval.benchmark import format_judges_table, format_table

        if not self.is_main:
            return {}
        with self.ema_weights():
            self.adapter.save_trained(self.out / "final")
        if base is None and (self.out / "base_eval.json").is_file():
            base = json.loads((self.out / "base_eval.json").read_text())
        result = {"final": final, "base": base, "iterations": self.iteration, "nan_skipped": self.nan_skipped}
        (self.out / "results.json").write_text(json.dumps(result, indent=1))
        plots.reward_curve(self.out / "metrics.jsonl", self.out / "reward_curve.png", self.evals)
        if base:
            lines = []
            for name in final:
                cols = {"base": base[name], "trained": final[name]}
                judge = final[name].get("judge", "reward")
                head = (f"### {name} prompts (CFG: base {base[name].get('guidance')}, trained "
                        f"{final[name].get('guidance')}; headline judge: {judge})")
                if "judges" in final[name] and "judges" in base[name]:
                    body = format_judges_table(cols)
                else:
                    body = format_table(cols)
                if "grid" in final[name]:
                    body += "\n\n" + _grid_table(cols)
                lines.append(head + "\n\n" + body)
                plots.compare_bars(cols, self.out / f"compare_{name}.png",
                                   title=f"ShapeWorld, {name} prompts ({judge})")
            (self.out / "report.md").write_text("\n\n".join(lines) + "\n")
            print("\n" + "\n\n".join(lines))
        return result


def _grid_table(cols: dict[str, dict]) -> str:
    """Overall score of each model at every CFG scale of the grid, for every judge."""
    rows = ["| model | CFG | " + " | ".join(next(iter(next(iter(cols.values()))["grid"].values()))) + " |"]
    rows.append("|---|---|" + "---|" * (rows[0].count("|") - 3))
    for m, r in cols.items():
        for g, vals in r["grid"].items():
            rows.append(f"| {m} | {g} | " + " | ".join(f"{v:.3f}" for v in vals.values()) + " |")
    return "\n".join(rows)
