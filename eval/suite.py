"""Several models on one or more benchmarks, one report: ``flowalign eval --model A --model B --benchmark X ...``.

- **Models** (``parse_model``): ``[NAME=]MODEL[+TRAINED][@METHOD[:key=value,...]]``. ``MODEL`` is a diffusers
  pipeline (directory, hub id, or ``shapeworld``, the shipped base); a run's ``final/`` (LoRA or a full
  ``transformer/``), a run directory (its ``final/``) or a full fine-tuning checkpoint (``checkpoints/iter_N``) given
  as ``MODEL`` is applied on top of ``--base`` (default ``shapeworld``), and ``BASE+TRAINED`` names both.
  ``@METHOD`` samples with an inference-time method of ``flowalign.noise.optimize`` (``best_of_n``, ``reno``,
  ``carinox``, ``fk``) and its options, e.g. ``@best_of_n:n=4,reward=shapeclip`` (``reward=a+b*0.1`` a weighted sum).
- **Benchmarks** (``parse_benchmark``): ``shapeworld-geneval`` (held-out test prompts), ``shapeworld-geneval-unseen``,
  ``shapeworld-compbench`` (``eval.compbench``), or a path: a GenEval ``evaluation_metadata.jsonl`` (the official
  file parses unchanged), a T2I-CompBench-layout directory of ``*_val.txt`` files, or one such file.
- **Noises**: record i of a benchmark is sampled from ``Generator(seed + i)`` at every CFG scale and for every model,
  so all models see the same noises (an inference-time method starts from them: its candidate 0 is that noise).
- **Resumable**: each image is a PNG under ``cache/<model key>/t<steps>_g<cfg>/`` named by its prompt's hash and its
  noise seed; the model key hashes the model's files (paths, sizes, modification times) and the method's options.
  Per-image scores are cached beside the images (``scores.jsonl``). Only missing images are generated (the model is
  loaded only then), only missing scores computed: a killed eval continues; a second run with nothing new only reads.
- **Statistics**: ``eval.stats`` (paired deltas against the first model when the records match, which they do
  whenever both models ran the same benchmark, n and seed).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .geneval import MetadataError
from .judges import HEADLINE, JUDGES, agreement
from .stats import compare, mean_se, summarize_scores

GENEVAL_BENCHMARKS = {"shapeworld-geneval": "test", "shapeworld-geneval-unseen": "test_unseen"}
KNOWN_BENCHMARKS = tuple(GENEVAL_BENCHMARKS) + ("shapeworld-compbench",)
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COMPBENCH_TASKS = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
SCORER_VERSION = "1"
JUDGE_LABEL = {"heldout_strict": "held-out strict (headline)", "heldout": "held-out", "train_strict": "train strict",
               "train": "train (reward)", "real": "real scorer"}


class EvalError(ValueError):
    """Bad input to the suite runner (one line)."""


# ================================================================================================ models
def _shown(path: str) -> str:
    from flowalign.shapeworld import MODEL_DIR

    p = Path(path)
    try:
        if p.exists() and p.resolve() == Path(MODEL_DIR).resolve():
            return "shapeworld"
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(path)
    except ValueError:  # outside the working directory: as given
        return str(path)


@dataclass
class ModelSpec:
    name: str
    base: str
    trained: str | None = None
    method: str | None = None
    options: dict = field(default_factory=dict)
    spec: str = ""

    def describe(self) -> str:
        """What the model is, for reports: the shipped model as ``shapeworld``, paths under the working directory
        relative to it (a report names no machine's absolute paths)."""
        base, trained = _shown(self.base), (None if self.trained is None else _shown(self.trained))
        s = base if trained is None else f"{base} + {trained}"
        if self.method:
            opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
            s += f" @ {self.method}" + (f" ({opts})" if opts else "")
        return s

    def key(self) -> str:
        """Hash of what decides this model's images: its files (path, size, mtime) and the method's options."""
        def files(p):
            p = Path(p)
            if not p.exists():
                return [str(p)]
            items = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
            return [(str(x.resolve()), x.stat().st_size, x.stat().st_mtime_ns) for x in items[:500]]

        blob = json.dumps({"base": files(self.base) if Path(self.base).exists() else self.base,
                           "trained": files(self.trained) if self.trained else None,
                           "method": self.method, "options": self.options}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def load(self):
        from flowalign.pipelines.base import load_adapter

        adapter = load_adapter(self.base)
        if self.trained:
            adapter.load_trained(self.trained)
        return adapter


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _reward_spec(s: str) -> dict:
    out = {}
    for part in s.split("+"):
        name, _, w = part.partition("*")
        if not name.strip():
            raise EvalError(f"bad reward {s!r} in a model spec: want NAME or NAME*WEIGHT joined by '+'")
        try:
            out[name.strip()] = float(w) if w.strip() else 1.0
        except ValueError:
            raise EvalError(f"bad reward weight {w!r} in {s!r}") from None
    return out


def is_pipeline_dir(p: Path) -> bool:
    return (p / "model_index.json").is_file()


def trained_dir(p: Path) -> Path | None:
    """A directory of trained weights (a run's final/, a run dir with final/, a checkpoint), or None."""
    from flowalign import checkpoint

    if not p.is_dir():
        return None
    if checkpoint.is_checkpoint(p) or (p / "transformer").is_dir() or any(p.glob("*.safetensors")):
        return p
    if (p / "final").is_dir():
        return trained_dir(p / "final")
    return None


def _resolve_base(s: str) -> str:
    from flowalign.pipelines.base import check_model_path
    from flowalign.trainer import resolve_model_path

    return check_model_path(resolve_model_path(s))


def _default_name(base: str, trained: str | None, method: str | None) -> str:
    if trained:
        p = Path(trained)
        parts = [x for x in p.parts if x not in ("final", "checkpoints")]
        name = parts[-1] if parts else p.name
        if p.parent.name == "checkpoints" and len(p.parts) >= 3:
            name = f"{p.parts[-3]}_{p.name}"
    else:
        name = "base" if base in ("shapeworld",) or base.rstrip("/").endswith("shapeworld/model") else Path(base).name
    return f"{name}+{method}" if method else name


def parse_model(spec: str, default_base: str = "shapeworld") -> ModelSpec:
    """``[NAME=]MODEL[+TRAINED][@METHOD[:key=value,...]]`` (module docstring). Bad specs raise one line."""
    raw = spec.strip()
    if not raw:
        raise EvalError("empty --model spec")
    name = None
    m = re.match(r"^([A-Za-z_][\w.-]*)=(.+)$", raw)
    if m and not Path(raw).exists():
        name, raw = m.group(1), m.group(2)
    method, options = None, {}
    if "@" in raw:
        raw, _, meth = raw.partition("@")
        mname, _, opts = meth.partition(":")
        from flowalign import noise

        try:
            method = noise.canonical_method(mname.strip())
        except ValueError as e:
            raise EvalError(f"model {spec!r}: {e}") from None
        for kv in [x for x in opts.split(",") if x.strip()]:
            k, eq, v = kv.partition("=")
            if not eq or not k.strip():
                raise EvalError(f"model {spec!r}: bad method option {kv!r} (want key=value)")
            options[k.strip()] = _reward_spec(v) if k.strip() == "reward" else _value(v.strip())
        options.setdefault("reward", {"shapeclip": 1.0})
    base_s, _, trained_s = raw.partition("+")
    if trained_s:
        base = _resolve_base(base_s)
        t = trained_dir(Path(trained_s).expanduser())
        if t is None:
            raise EvalError(f"model {spec!r}: no trained weights in {trained_s} (want a run's final/ with "
                            f"transformer/ or LoRA .safetensors, a run directory, or checkpoints/iter_N)")
        trained = str(t)
    else:
        p = Path(base_s).expanduser()
        if base_s != "shapeworld" and p.is_dir() and not is_pipeline_dir(p):
            t = trained_dir(p)
            if t is None:
                raise EvalError(f"model {spec!r}: {base_s} is neither a diffusers pipeline (no model_index.json) nor "
                                f"trained weights (no transformer/, LoRA .safetensors, final/ or checkpoint)")
            base, trained = _resolve_base(default_base), str(t)
        else:
            base, trained = _resolve_base(base_s), None
    return ModelSpec(name=name or _default_name(base if base_s != "shapeworld" else "shapeworld", trained, method),
                     base=base, trained=trained, method=method, options=options, spec=spec)


# ================================================================================================ benchmarks
@dataclass
class Suite:
    name: str
    kind: str            # "geneval" | "compbench"
    records: list
    scorer: str          # "shapeworld" | "real"
    tasks: tuple
    guidance: tuple | None = None  # this benchmark's CFG grid (default: the run's)

    @property
    def judges(self) -> tuple:
        return JUDGES if self.scorer == "shapeworld" else ("real",)

    @property
    def headline(self) -> str:
        return HEADLINE if self.scorer == "shapeworld" else "real"


def _is_shapeworld_geneval(records) -> bool:
    from flowalign.shapeworld.world import COLORS, SHAPES

    for r in records:
        for c in list(r.get("include", [])) + list(r.get("exclude", [])):
            if c["class"] not in SHAPES or ("color" in c and c["color"] not in COLORS):
                return False
    return True


def parse_benchmark(spec: str, n_per_task: int | None = None, images_per_prompt: int = 4,
                    real_geneval: bool = False, real_compbench: bool = False) -> Suite:
    from .benchmark import subsample
    from .compbench import SHAPEWORLD_COMPBENCH, check_shapeworld_records, load_compbench
    from .geneval import load_metadata

    if spec in GENEVAL_BENCHMARKS:
        from flowalign.shapeworld.prompts import prompt_file

        return Suite(spec, "geneval", subsample(load_metadata(prompt_file(GENEVAL_BENCHMARKS[spec])), n_per_task),
                     "shapeworld", GENEVAL_TASKS)
    if spec == SHAPEWORLD_COMPBENCH:
        return Suite(spec, "compbench", load_compbench(spec, images_per_prompt, n_per_task), "shapeworld",
                     COMPBENCH_TASKS)
    p = Path(spec).expanduser()
    looks_path = p.suffix in (".jsonl", ".json", ".txt") or "/" in spec or p.exists()
    if not looks_path:
        raise EvalError(f"unknown benchmark {spec!r}; known: {', '.join(KNOWN_BENCHMARKS)}, or a path to a GenEval "
                        f"metadata .jsonl or a T2I-CompBench prompt directory / *_val.txt file")
    if not p.exists():
        raise FileNotFoundError(f"benchmark file not found: {spec}")
    if p.is_dir() or p.suffix == ".txt":
        recs = load_compbench(p, images_per_prompt, n_per_task)
        try:
            check_shapeworld_records(recs)
            scorer = "shapeworld"
        except MetadataError as e:
            if not real_compbench:
                raise EvalError(f"{spec}: the ShapeWorld rules cannot score it ({e}); for real prompts pass "
                                f"--compbench-blip / --compbench-owl / --compbench-clip") from None
            scorer = "real"
        return Suite(str(spec), "compbench", recs, scorer, COMPBENCH_TASKS)
    recs = subsample(load_metadata(p), n_per_task)
    if _is_shapeworld_geneval(recs):
        scorer = "shapeworld"
    elif real_geneval:
        scorer = "real"
    else:
        bad = sorted({c["class"] for r in recs for c in r["include"]} - set(_sw_shapes()))[:5]
        raise EvalError(f"{spec}: names classes the ShapeWorld judges do not know ({', '.join(bad)}, ...): pass "
                        f"--geneval-detector OWLV2_DIR_OR_HUB_ID to judge real images")
    tags = tuple(dict.fromkeys(list(GENEVAL_TASKS) + [r["tag"] for r in recs]))
    return Suite(str(spec), "geneval", recs, scorer, tags)


def geneval_vocabulary(records) -> list[str]:
    """Every class a benchmark's records name, in first-seen order: the detector's queries for all its images."""
    return list(dict.fromkeys(c["class"] for r in records for c in list(r["include"]) + list(r.get("exclude", []))))


def _sw_shapes():
    from flowalign.shapeworld.world import SHAPES
    return SHAPES


# ================================================================================================ cache
def _prompt_hash(p: str) -> str:
    return hashlib.sha1(p.encode()).hexdigest()[:12]


class ImageCache:
    """PNG per (model, steps, cfg, prompt, noise seed) and a scores.jsonl per (model, steps, cfg)."""

    def __init__(self, root, model_key: str, steps: int, guidance: float):
        self.dir = Path(root) / model_key / f"t{steps}_g{guidance:g}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scores_path = self.dir / "scores.jsonl"
        self._scores: dict[tuple[str, str], object] | None = None

    def path(self, prompt: str, noise_seed: int) -> Path:
        return self.dir / f"{_prompt_hash(prompt)}_{noise_seed}.png"

    def save(self, prompt: str, noise_seed: int, img: np.ndarray) -> None:
        from PIL import Image

        p = self.path(prompt, noise_seed)
        tmp = p.with_suffix(".tmp.png")
        Image.fromarray(img).save(tmp)
        os.replace(tmp, p)  # atomic: a killed run never leaves half an image under the final name

    def load(self, prompt: str, noise_seed: int) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(self.path(prompt, noise_seed)).convert("RGB"))

    def scores(self) -> dict:
        if self._scores is None:
            self._scores = {}
            if self.scores_path.is_file():
                for line in self.scores_path.read_text().splitlines():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: recomputed
                        continue
                    self._scores[(r["file"], r["scorer"])] = r["value"]
        return self._scores

    def add_scores(self, scorer: str, items: dict) -> None:
        s = self.scores()
        with open(self.scores_path, "a") as f:
            for name, v in items.items():
                s[(name, scorer)] = v
                f.write(json.dumps({"file": name, "scorer": scorer, "value": v}) + "\n")


# ================================================================================================ runner
@dataclass
class Options:
    steps: int = 20
    guidance: tuple = (2.0,)
    seed: int = 1000
    batch_size: int = 100
    cache: str = "runs/eval_cache"
    rewards: tuple = ()
    diversity: str | None = "shapeclip"   # "shapeclip" | "clip=PATH" | None
    geneval_detector: str | None = None
    compbench_blip: str | None = None
    compbench_owl: str | None = None
    compbench_clip: str | None = None
    progress: bool = True
    grid_per_task: int = 6


class Runner:
    def __init__(self, models: list[ModelSpec], suites: list[Suite], opt: Options):
        if not models:
            raise EvalError("no models to evaluate")
        names = [m.name for m in models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise EvalError(f"two models are named {', '.join(sorted(dup))}: name them with NAME=MODEL")
        self.models, self.suites, self.opt = models, suites, opt
        self._adapters: dict[str, object] = {}
        self._shapeclip = None
        self._rewards: dict[str, object] = {}
        self._real = {}
        for r in opt.rewards:  # unknown names fail before any model loads
            self.reward(r)

    # ------------------------------------------------------------------------------- helpers
    def adapter(self, m: ModelSpec):
        if m.name not in self._adapters:
            from diffusers.utils import logging as dlog

            from transformers.utils import logging as tlog

            dlog.disable_progress_bar()
            tlog.disable_progress_bar()
            self._adapters[m.name] = m.load()
        return self._adapters[m.name]

    def shapeclip(self):
        if self._shapeclip is None:
            from flowalign.rewards import build_reward
            self._shapeclip = build_reward("shapeclip")
        return self._shapeclip

    def reward(self, name: str):
        if name not in self._rewards:
            from flowalign.rewards import build_reward
            self._rewards[name] = build_reward(name)
        return self._rewards[name]

    def grid(self, suite: Suite) -> tuple:
        return tuple(suite.guidance or self.opt.guidance)

    def noise_seeds(self, suite: Suite) -> list[int]:
        return [self.opt.seed + i for i in range(len(suite.records))]

    # ------------------------------------------------------------------------------- generation
    def generate(self, m: ModelSpec, suite: Suite, g: float, cache: ImageCache) -> np.ndarray:
        import torch

        seeds = self.noise_seeds(suite)
        recs = suite.records
        missing = [i for i, (r, s) in enumerate(zip(recs, seeds)) if not cache.path(r["prompt"], s).is_file()]
        if missing:
            adapter = self.adapter(m)
            bar = None
            if self.opt.progress:
                from tqdm import tqdm
                bar = tqdm(total=len(missing), desc=f"{m.name} {suite.name} cfg {g:g}", unit="img", leave=False)
            bs = self.opt.batch_size
            for k in range(0, len(missing), bs):
                idx = missing[k:k + bs]
                prompts = [recs[i]["prompt"] for i in idx]
                if m.method is None:
                    from flowalign.rollout import sample_ode

                    with torch.no_grad():
                        x = torch.cat([adapter.init_noise(1, torch.Generator().manual_seed(seeds[i])) for i in idx])
                        cond = adapter.encode(prompts, negative="" if g > 1 else None)
                        imgs = sample_ode(adapter, cond, self.opt.steps, g, x.to(adapter.device))
                else:
                    from flowalign import noise

                    metas = [recs[i] if "include" in recs[i] else noise.metadata_for_prompt(recs[i]["prompt"])
                             for i in idx]
                    opts = {k2: v for k2, v in m.options.items() if k2 != "reward"}
                    res = noise.optimize(adapter, prompts, m.options["reward"], m.method, seed=self.opt.seed,
                                         metadata=metas if all(x is not None for x in metas) else None, guidance=g,
                                         num_steps=self.opt.steps, indices=[seeds[i] - self.opt.seed for i in idx],
                                         **opts)
                    imgs = res.images
                arr = (imgs.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                for i, a in zip(idx, arr):
                    cache.save(recs[i]["prompt"], seeds[i], a)
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.close()
        return np.stack([cache.load(r["prompt"], s) for r, s in zip(recs, seeds)])

    # ------------------------------------------------------------------------------- scoring
    def _cached(self, cache: ImageCache, scorer: str, names: list[str], images: np.ndarray, fn) -> list:
        have = cache.scores()
        todo = [k for k, n in enumerate(names) if (n, scorer) not in have]
        if todo:
            vals = fn(todo)
            cache.add_scores(scorer, {names[k]: v for k, v in zip(todo, vals)})
        return [have[(n, scorer)] for n in names]

    def score(self, suite: Suite, images: np.ndarray, cache: ImageCache, names: list[str]) -> list[dict]:
        """Per image ``{"scores": {judge: float}, "verdicts": {judge: bool|None}}``."""
        recs = suite.records
        if suite.kind == "geneval" and suite.scorer == "shapeworld":
            from .judges import judge_all

            def fn(todo):
                out = judge_all([recs[k] for k in todo], images[todo])["per_image"]
                return [{"verdicts": r["verdicts"], "partial": r["partial"]} for r in out]

            vals = self._cached(cache, f"sw-geneval-v{SCORER_VERSION}", names, images, fn)
            return [{"scores": {j: float(v["verdicts"][j]) for j in JUDGES}, "verdicts": v["verdicts"],
                     "partial": v["partial"]} for v in vals]
        if suite.kind == "geneval":
            det = self.opt.geneval_detector

            def fn(todo):
                import torch

                from .geneval import judge
                key = ("geneval", suite.name)
                if key not in self._real:  # one fixed vocabulary per benchmark: a verdict never depends on its batch
                    from flowalign.rewards.geneval import GenEvalReward
                    self._real[key] = GenEvalReward(path=det, vocabulary=geneval_vocabulary(recs))
                rw = self._real[key]
                x = torch.from_numpy(images[todo]).permute(0, 3, 1, 2).float() / 255
                dets = rw.detect(x, [recs[k] for k in todo])
                return [list(judge(recs[k], d)) for k, d in zip(todo, dets)]

            vals = self._cached(cache, f"owl-geneval-v{SCORER_VERSION}:{det}", names, images, fn)
            return [{"scores": {"real": float(c)}, "verdicts": {"real": bool(c)}, "partial": p} for c, p in vals]
        if suite.scorer == "shapeworld":
            from .compbench import score_shapeworld

            def fn(todo):
                return score_shapeworld([recs[k] for k in todo], images[todo], self.shapeclip())

            return self._cached(cache, f"sw-compbench-v{SCORER_VERSION}", names, images, fn)
        o = self.opt
        sid = f"real-compbench-v{SCORER_VERSION}:{o.compbench_blip}:{o.compbench_owl}:{o.compbench_clip}"

        def fn(todo):
            if "compbench" not in self._real:
                from .compbench import RealCompBench
                self._real["compbench"] = RealCompBench(o.compbench_blip, o.compbench_owl, o.compbench_clip)
            return self._real["compbench"].score([recs[k] for k in todo], images[todo])

        return self._cached(cache, sid, names, images, fn)

    def extras(self, suite: Suite, images: np.ndarray, cache: ImageCache, names: list[str]) -> dict:
        """Per image: artifact flag (ShapeWorld), embedding for diversity, extra rewards."""
        import torch

        out: dict[str, list] = {}
        x = lambda todo: torch.from_numpy(images[todo]).permute(0, 3, 1, 2).float() / 255  # noqa: E731
        if suite.scorer == "shapeworld":
            from flowalign.shapeworld.artifacts import is_artifact
            from flowalign.shapeworld.detector import artifact_stats

            out["artifact"] = self._cached(cache, "artifact-v1", names, images,
                                           lambda todo: [bool(is_artifact(artifact_stats(images[k]))) for k in todo])
        div = self.opt.diversity
        if div:
            if div == "shapeclip":
                def emb(todo):
                    with torch.no_grad():
                        return self.shapeclip().image_embeds(x(todo)).tolist()
            elif div.startswith("clip="):
                path = div.split("=", 1)[1]

                def emb(todo):
                    if "clip_div" not in self._real:
                        from flowalign.rewards._clip import CLIPScorer
                        self._real["clip_div"] = CLIPScorer.load(path, None, what="diversity CLIP")
                    with torch.no_grad():
                        return self._real["clip_div"].image_features(x(todo)).tolist()
            else:
                raise EvalError(f"--diversity must be shapeclip, clip=PATH or none, got {div!r}")
            out["embedding"] = [np.asarray(v, np.float32) for v in
                                self._cached(cache, f"embed-{div}", names, images, emb)]
        for rname in self.opt.rewards:
            rw = self.reward(rname)
            if rw.needs_metadata and not all("include" in r for r in suite.records):
                continue  # e.g. the shapeworld judge on T2I-CompBench prompts: no GenEval metadata, no column

            def fn(todo, rw=rw):
                metas = [suite.records[k] for k in todo]
                md = metas if all("include" in m for m in metas) else None
                with torch.no_grad():
                    return rw(x(todo), [m["prompt"] for m in metas], md)["reward"].float().tolist()

            out[f"reward:{rname}"] = self._cached(cache, f"reward-{rname}", names, images, fn)
        return out

    # ------------------------------------------------------------------------------- run
    def run(self) -> dict:
        results = {"protocol": {"steps": self.opt.steps, "guidance": list(self.opt.guidance), "seed": self.opt.seed,
                                "noise": "record i of a benchmark starts from torch.Generator().manual_seed(seed + i)"},
                   "models": [{"name": m.name, "spec": m.spec, "model": m.describe(), "key": m.key()}
                              for m in self.models], "suites": {}}
        self.images: dict = {}
        for suite in self.suites:
            S = {"kind": suite.kind, "scorer": suite.scorer, "headline": suite.headline, "n": len(suite.records),
                 "guidance": list(self.grid(suite)), "models": {}}
            keys = [(r["prompt"], s) for r, s in zip(suite.records, self.noise_seeds(suite))]
            tags = [r["tag"] for r in suite.records]
            per_model = {}
            for m in self.models:
                grid = {}
                for g in self.grid(suite):
                    cache = ImageCache(self.opt.cache, m.key(), self.opt.steps, g)
                    images = self.generate(m, suite, g, cache)
                    names = [cache.path(r["prompt"], s).name for r, s in zip(suite.records, self.noise_seeds(suite))]
                    per = self.score(suite, images, cache, names)
                    grid[g] = {"per_image": per, "images": images, "cache": cache, "names": names}
                best = max(self.grid(suite), key=lambda g: summarize_scores(
                    tags, [p["scores"][suite.headline] for p in grid[g]["per_image"]], suite.tasks)["overall"])
                b = grid[best]
                ex = self.extras(suite, b["images"], b["cache"], b["names"])
                per_model[m.name] = {"per_image": b["per_image"], "extras": ex, "best": best}
                self.images[(suite.name, m.name)] = (b["images"], b["per_image"])
                S["models"][m.name] = self.summarize_model(suite, tags, grid, best, ex)
            # deltas against the first model, each at its headline CFG
            first = self.models[0].name
            S["deltas"] = {}
            for m in self.models[1:]:
                a, b = per_model[first], per_model[m.name]
                d = {j: compare(tags, [p["scores"][j] for p in a["per_image"]], keys,
                                tags, [p["scores"][j] for p in b["per_image"]], keys, suite.tasks)
                     for j in suite.judges}
                d["extras"] = self.extras_delta(suite, tags, keys, a["extras"], b["extras"])
                S["deltas"][m.name] = d
            S["paired"] = True  # same records and noise seeds for every model (asserted by compare on the keys)
            results["suites"][suite.name] = S
        self.results = results
        return results

    def summarize_model(self, suite: Suite, tags, grid: dict, best: float, ex: dict) -> dict:
        per = grid[best]["per_image"]
        judges = {j: summarize_scores(tags, [p["scores"][j] for p in per], suite.tasks) for j in suite.judges}
        out = {"best_guidance": best, "judges": judges,
               "grid": {f"{g:g}": {j: summarize_scores(tags, [p["scores"][j] for p in v["per_image"]],
                                                       suite.tasks)["overall"] for j in suite.judges}
                        for g, v in grid.items()}}
        if suite.scorer == "shapeworld":
            agree = {}
            for a, b in (("train", "heldout"), ("train_strict", "heldout_strict")):
                rows = [(t, p["verdicts"][a], p["verdicts"][b]) for t, p in zip(tags, per)
                        if p["verdicts"][a] is not None]
                if rows:
                    agree[f"{a}_vs_{b}"] = agreement(*zip(*rows))
            out["agreement"] = agree
        out["extras"] = self.summarize_extras(suite, tags, ex)
        return out

    @staticmethod
    def _diversity(tags, prompts, emb) -> tuple[list[str], list[str], list[float]]:
        """Per prompt with >= 2 images: (tag, prompt, mean pairwise 1 - cos of its image embeddings)."""
        by: dict[str, list[int]] = {}
        for k, p in enumerate(prompts):
            by.setdefault(p, []).append(k)
        t_out, p_out, v_out = [], [], []
        for p, idx in by.items():
            if len(idx) < 2:
                continue
            e = np.stack([emb[k] for k in idx]).astype(np.float64)
            e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-12
            c = e @ e.T
            iu = np.triu_indices(len(idx), 1)
            t_out.append(tags[idx[0]])
            p_out.append(p)
            v_out.append(float(np.mean(1 - c[iu])))
        return t_out, p_out, v_out

    def summarize_extras(self, suite: Suite, tags, ex: dict) -> dict:
        out = {}
        if "artifact" in ex:
            m, se = mean_se([float(v) for v in ex["artifact"]])
            out["artifact_rate"] = {"mean": m, "se": se, "n": len(ex["artifact"])}
        if "embedding" in ex:
            t, p, v = self._diversity(tags, [r["prompt"] for r in suite.records], ex["embedding"])
            s = summarize_scores(t, v, suite.tasks)
            m, se = mean_se(v)
            out["diversity"] = {"mean": m, "se": se, "n_prompts": len(v), "per_task": s["per_task"],
                                "measure": f"mean pairwise 1 - cos of {self.opt.diversity} image embeddings per prompt"}
        for k, v in ex.items():
            if k.startswith("reward:"):
                s = summarize_scores(tags, v, suite.tasks)
                m, se = mean_se(v)
                out[k] = {"mean": m, "se": se, "per_task": s["per_task"]}
        return out

    def extras_delta(self, suite, tags, keys, a: dict, b: dict) -> dict:
        out = {}
        one = ["all"] * len(tags)
        if "artifact" in a:
            out["artifact_rate"] = compare(one, [float(v) for v in a["artifact"]], keys,
                                           one, [float(v) for v in b["artifact"]], keys)
        if "embedding" in a:
            prompts = [r["prompt"] for r in suite.records]
            ta, pa, va = self._diversity(tags, prompts, a["embedding"])
            tb, pb, vb = self._diversity(tags, prompts, b["embedding"])
            out["diversity"] = compare(["all"] * len(va), va, pa, ["all"] * len(vb), vb, pb)
        for k in a:
            if k.startswith("reward:"):
                out[k] = compare(one, a[k], keys, one, b[k], keys)
        return out


# ================================================================================================ report
def _fmt(x, se=None, signed=False, bold=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    s = f"{x:+.3f}" if signed else f"{x:.3f}"
    if se is not None and not math.isnan(se):
        s += f" ± {se:.3f}"
    return f"**{s}**" if bold else s


def side_by_side(S: dict, models: list[str], judge: str, tasks) -> str:
    """Per task: each model's score ± SE at its headline CFG, then each later model's delta vs the first ± SE
    (paired), with ``*`` when |delta| > 2 SE."""
    first = models[0]
    present = [t for t in tasks if any(t in S["models"][m]["judges"][judge]["per_task"] for m in models)]
    head = ["task"] + [f"{m} (cfg {S['models'][m]['best_guidance']:g})" for m in models] + \
           [f"Δ {m} − {first}" for m in models[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]

    def star(d, se):
        return " *" if se > 0 and abs(d) > 2 * se else ""

    for t in present + ["overall"]:
        cells = []
        for m in models:
            j = S["models"][m]["judges"][judge]
            if t == "overall":
                cells.append(_fmt(j["overall"], j["se_overall"], bold=True))
            else:
                cells.append(_fmt(j["per_task"].get(t), j["se_per_task"].get(t)))
        for m in models[1:]:
            d = S["deltas"][m][judge]
            if t == "overall":
                cells.append(_fmt(d["overall"], d["se_overall"], signed=True, bold=True) + star(d["overall"],
                                                                                                d["se_overall"]))
            elif t in d["per_task"]:
                v = d["per_task"][t]
                cells.append(_fmt(v["delta"], v["se"], signed=True) + star(v["delta"], v["se"]))
            else:
                cells.append("–")
        lines.append(f"| {'**overall**' if t == 'overall' else t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_judges_table(S: dict, models: list[str], judges, tasks) -> str:
    present = [t for t in tasks if any(t in S["models"][m]["judges"][judges[0]]["per_task"] for m in models)]
    cols = [(j, m) for j in judges for m in models]
    head = ["task"] + [f"{JUDGE_LABEL.get(j, j)}: {m}" for j, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for t in present:
        lines.append(f"| {t} | " + " | ".join(_fmt(S["models"][m]["judges"][j]["per_task"].get(t),
                                                   S["models"][m]["judges"][j]["se_per_task"].get(t))
                                              for j, m in cols) + " |")
    lines.append("| **overall** | " + " | ".join(_fmt(S["models"][m]["judges"][j]["overall"],
                                                      S["models"][m]["judges"][j]["se_overall"], bold=True)
                                                 for j, m in cols) + " |")
    return "\n".join(lines)


def grid_table(S: dict, models: list[str], judge: str) -> str:
    gs = list(S["models"][models[0]]["grid"])
    lines = ["| model | " + " | ".join(f"cfg {g}" for g in gs) + " | best |", "|---|" + "---|" * (len(gs) + 1)]
    for m in models:
        r = S["models"][m]
        lines.append(f"| {m} | " + " | ".join(_fmt(r["grid"][g][judge], bold=(float(g) == r["best_guidance"]))
                                             for g in gs) + f" | {r['best_guidance']:g} |")
    return "\n".join(lines)


def extras_table(S: dict, models: list[str]) -> str:
    first = models[0]
    keys = [k for k in S["models"][first]["extras"]]
    if not keys:
        return ""
    label = {"artifact_rate": "artifact rate (exact, ShapeWorld)", "diversity": "within-prompt diversity"}
    head = ["measure"] + models + [f"Δ {m} − {first}" for m in models[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for k in keys:
        cells = [_fmt(S["models"][m]["extras"][k]["mean"], S["models"][m]["extras"][k]["se"]) for m in models]
        for m in models[1:]:
            d = S["deltas"][m]["extras"][k]
            cells.append(_fmt(d["overall"], d["se_overall"], signed=True)
                         + ("" if d["paired"] else " (unpaired)"))
        lines.append(f"| {label.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s).name if "/" in s else s).strip("_") or "suite"


def bar_chart(S: dict, models: list[str], judge: str, tasks, title: str, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [t for t in tasks if t in S["models"][models[0]]["judges"][judge]["per_task"]] + ["overall"]
    fig, ax = plt.subplots(figsize=(1.1 * len(present) + 1.5, 3.2), dpi=80)
    w = 0.8 / len(models)
    for k, m in enumerate(models):
        j = S["models"][m]["judges"][judge]
        ys = [j["per_task"][t] if t != "overall" else j["overall"] for t in present]
        es = [j["se_per_task"][t] if t != "overall" else j["se_overall"] for t in present]
        ax.bar(np.arange(len(present)) + (k - (len(models) - 1) / 2) * w, ys, w, yerr=es, capsize=2,
               label=f"{m} (cfg {S['models'][m]['best_guidance']:g})")
    ax.set_xticks(np.arange(len(present)))
    ax.set_xticklabels(present, rotation=20, fontsize=8)
    ax.set_ylabel(JUDGE_LABEL.get(judge, judge), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(images_by_model: dict, suite: Suite, judge: str, path, per_task: int = 6, scale: int = 2) -> Path:
    """Per task a block of rows (one per model) of the task's first ``per_task`` records: the same prompts and
    noises in every row; border green / red by the model's verdict under ``judge`` (grey: no verdict)."""
    from PIL import Image, ImageDraw

    from .benchmark import _font

    font = _font(10)
    models = list(images_by_model)
    any_imgs = next(iter(images_by_model.values()))[0]
    side = any_imgs.shape[1] * scale
    tile = side + 4
    label_w = 90
    tasks = [t for t in suite.tasks if any(r["tag"] == t for r in suite.records)]
    rows_h = len(tasks) * (14 + len(models) * tile) + 4
    W = label_w + per_task * tile + 4
    grid = Image.new("RGB", (W, rows_h), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    y = 2
    for t in tasks:
        # different prompts first (T2I-CompBench records repeat each prompt: copy 0 of each, then copy 1, ...)
        idx = sorted((i for i, r in enumerate(suite.records) if r["tag"] == t),
                     key=lambda i: (suite.records[i].get("copy", 0), i))[:per_task]
        d.text((2, y), f"{t}: " + "; ".join(suite.records[i]["prompt"].removeprefix("a photo of ")
                                            for i in idx[:2]) + (" ..." if len(idx) > 2 else ""),
               fill=(0, 0, 0), font=font)
        y += 14
        for m in models:
            imgs, per = images_by_model[m]
            d.text((2, y + tile // 2 - 6), m[:14], fill=(0, 0, 0), font=font)
            for c, i in enumerate(idx):
                v = per[i]["verdicts"].get(judge)
                col = (150, 150, 150) if v is None else ((40, 170, 40) if v else (200, 40, 40))
                x0 = label_w + c * tile
                d.rectangle([x0, y, x0 + tile - 1, y + tile - 1], fill=col)
                grid.paste(Image.fromarray(imgs[i]).resize((side, side), Image.NEAREST), (x0 + 2, y + 2))
            y += tile
    path = Path(path)
    grid.save(path, optimize=True)
    return path


def write_report(runner: Runner, out_dir, command: str | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    R = runner.results
    models = [m.name for m in runner.models]
    md = ["# Evaluation report", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    p = R["protocol"]
    md += [f"Protocol: {p['steps']} ODE steps, CFG grid {', '.join(f'{g:g}' for g in p['guidance'])} (each model "
           f"headlined at its best scale under the headline judge), seed {p['seed']}: record i of every benchmark "
           f"starts from the noise of seed + i for every model. Deltas are against **{models[0]}**, paired per "
           f"image (same prompts, same noises; SE of the per-image differences, `eval/stats.py`); `*`: |Δ| > 2 SE.",
           "", "Models:", ""]
    md += [f"- **{m['name']}**: {m['model']}" for m in R["models"]]
    pngs = []
    for suite in runner.suites:
        S = R["suites"][suite.name]
        slug = _slug(suite.name)
        hl = S["headline"]
        md += ["", f"## {suite.name} ({S['n']} images per model and CFG scale, {suite.kind}-style, "
                   f"{'ShapeWorld judges' if suite.scorer == 'shapeworld' else 'real scorers'}; CFG grid "
                   f"{', '.join(f'{g:g}' for g in S['guidance'])})", ""]
        if suite.kind == "compbench" and suite.scorer == "shapeworld":
            md += ["Scores: T2I-CompBench's rules (`eval/compbench.py`): attribute binding = product over noun phrases "
                   "of the detector's yes/no, spatial = 0.25 + 0.25 + 0.5 x position (0 under 0.5), non-spatial = "
                   "shapeclip cosine, complex = mean of the three.", ""]
        md += [f"### Headline judge: {JUDGE_LABEL.get(hl, hl)}", "", side_by_side(S, models, hl, suite.tasks), ""]
        if len(suite.judges) > 1:
            order = ("heldout_strict", "heldout", "train_strict", "train")
            md += ["### Every judge", "", all_judges_table(S, models, order, suite.tasks), ""]
            ag = "; ".join(f"{m}: " + ", ".join(f"{k.replace('_vs_', ' vs ')} {v['overall']:.3f}"
                                               for k, v in S["models"][m].get("agreement", {}).items())
                           for m in models)
            md += [f"Per-image agreement of the training and held-out judges: {ag}.", ""]
            md += ["Deltas under every judge (overall, paired SE):", "",
                   "| model | " + " | ".join(JUDGE_LABEL[j] for j in order) + " |",
                   "|---|" + "---|" * len(order)]
            for m in models[1:]:
                md.append(f"| {m} − {models[0]} | " + " | ".join(
                    _fmt(S["deltas"][m][j]["overall"], S["deltas"][m][j]["se_overall"], signed=True)
                    for j in order) + " |")
            md.append("")
        md += [f"### CFG grid ({JUDGE_LABEL.get(hl, hl)}, overall)", "", grid_table(S, models, hl), ""]
        et = extras_table(S, models)
        if et:
            md += ["### Beyond the score", "", et, "",
                   "Artifact rate: fraction of images `shapeworld.artifacts.is_artifact` flags (off-palette pixels, "
                   "unexplained foreground, speckle; 0% on clean renders). Diversity: per prompt with at least two "
                   "images, the mean pairwise 1 − cosine of image embeddings, averaged over prompts (delta paired by "
                   "prompt). A proxy's rise next to a fall in diversity or a rise in artifacts is reward hacking.", ""]
        bar = bar_chart(S, models, hl, suite.tasks, f"{suite.name}: {JUDGE_LABEL.get(hl, hl)}",
                        out / f"bars_{slug}.png")
        grid = sample_grid({m: runner.images[(suite.name, m)] for m in models}, suite, hl,
                           out / f"samples_{slug}.png", runner.opt.grid_per_task)
        pngs += [bar, grid]
        md += [f"![bars]({bar.name})", "", f"Samples (same prompts and noises in every row; border: "
               f"{JUDGE_LABEL.get(hl, hl)} verdict, green yes, red no, grey none):", "", f"![samples]({grid.name})", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(R, indent=1, default=float))
    return {"report": out / "report.md", "results": out / "results.json", "pngs": pngs}
