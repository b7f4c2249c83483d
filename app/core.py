"""The demo's logic as plain functions: what the Gradio callbacks in ``app.py`` call, testable without a browser.

Only the public API is used: ``pipelines.load_adapter`` / ``adapter.load_trained``, ``eval.benchmark.generate``
(the evaluation's per-record noise, so seed s here is the image the benchmark gives record s), ``eval.judges``,
the ShapeWorld detectors, the reward registry and ``noise.optimize`` (with its ``callback`` for streaming).

Every user-facing failure (an empty prompt, a bad checkpoint, an unknown reward, a missing run directory) is a
``DemoError`` whose one-line message the page shows; ``guard`` turns anything unexpected into such a line too
(the traceback goes to the server's log, never to the page).
"""
from __future__ import annotations

import io
import json
import logging
import math
import queue
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("flowalign.app")

BASE_MODEL = "shapeworld"
DISPLAY_SIDE = 256
REWARD_ORDER = ("shapeworld", "shapeclip", "artifact", "jpeg_compressibility", "jpeg_incompressibility")
METHOD_LABELS = {"best_of_n": "best-of-N", "reno": "ReNO", "carinox": "CARINOX", "fk": "FK steering"}
JUDGE_LABELS = {"heldout_strict": "held-out strict (headline)", "heldout": "held-out",
                "train_strict": "training judge, strict", "train": "training judge (shapeworld reward)"}


# Loading models is not thread-safe: diffusers / transformers build modules on the meta device under a process-wide
# patch (accelerate's init_empty_weights), so a model built in another thread meanwhile gets meta tensors ("Cannot
# copy out of meta tensor"). Every load in the app (pipelines, trained weights, reward models) holds this lock.
LOAD_LOCK = threading.RLock()


class DemoError(ValueError):
    """A problem the user can fix; its message is shown in the page."""


def guard(fn, *args, **kwargs):
    """(result, None) or (None, message): a DemoError's own line, or one line naming an unexpected error."""
    from flowalign.noise import NoiseOptError
    from flowalign.rewards.base import RewardError

    try:
        return fn(*args, **kwargs), None
    except (DemoError, NoiseOptError, RewardError) as e:
        return None, str(e)
    except Exception as e:  # the page must stay alive: one line there, the traceback in the server log
        log.error("demo callback %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
        return None, f"internal error ({type(e).__name__}): {first_line(e)}"


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


# ================================================================================================ models
@dataclass(frozen=True)
class ModelChoice:
    """A model the demo can load: a base pipeline, optionally with a run's trained weights applied."""
    label: str
    base: str                 # pipeline dir, hub id, or "shapeworld"
    weights: str | None = None  # a run's final/ (LoRA .safetensors or a full transformer/), or None
    kind: str = "base"        # "base", "full" or "lora"
    run_dir: str | None = None


def weights_kind(d: Path) -> str | None:
    """'full' (a transformer/ folder), 'lora' (.safetensors files) or None."""
    if (d / "transformer").is_dir():
        return "full"
    if d.is_dir() and any(d.glob("*.safetensors")):
        return "lora"
    return None


def run_base_model(run_dir: Path) -> str:
    """The base model a run trained from (its config.json's model.path), default the shipped ShapeWorld model."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        return str(cfg.get("model", {}).get("path") or BASE_MODEL)
    except (OSError, ValueError, AttributeError):
        return BASE_MODEL


def _run_dirs(runs_dir: Path, marker) -> list[Path]:
    """Run directories (depth 1 or 2 below runs_dir) for which marker(dir) holds, sorted by name."""
    if not runs_dir.is_dir():
        return []
    found = []
    for d in sorted(runs_dir.iterdir()):
        if not d.is_dir():
            continue
        if marker(d):
            found.append(d)
        else:
            found += [e for e in sorted(d.iterdir()) if e.is_dir() and marker(e)]
    return found


def scan_runs(runs_dir) -> list[ModelChoice]:
    """Every run under ``runs_dir`` with trained weights in ``final/`` (LoRA or full)."""
    runs_dir = Path(runs_dir).expanduser()
    out = []
    for d in _run_dirs(runs_dir, lambda e: weights_kind(e / "final") is not None):
        kind = weights_kind(d / "final")
        name = d.relative_to(runs_dir).as_posix()
        out.append(ModelChoice(f"{name} ({kind})", run_base_model(d), str(d / "final"), kind, str(d)))
    return out


def model_choices(runs_dir, base: str = BASE_MODEL) -> "OrderedDict[str, ModelChoice]":
    """label -> ModelChoice: the base first, then every trained run found under ``runs_dir``."""
    choices = OrderedDict()
    b = ModelChoice(f"base ({base})", base)
    choices[b.label] = b
    for c in scan_runs(runs_dir):
        choices[c.label] = c
    return choices


def choice_from_path(path: str, base: str = BASE_MODEL) -> ModelChoice:
    """A model named by a path the user typed: a run directory (its final/), a weights directory, or a pipeline
    directory (model_index.json)."""
    p = Path(path.strip()).expanduser()
    if not p.exists():
        raise DemoError(f"no such directory: {path.strip()}")
    if not p.is_dir():
        raise DemoError(f"not a directory: {path.strip()}")
    if (p / "model_index.json").is_file():
        return ModelChoice(f"pipeline {p.name}", str(p))
    if weights_kind(p / "final"):
        return ModelChoice(f"{p.name} ({weights_kind(p / 'final')})", run_base_model(p), str(p / "final"),
                           weights_kind(p / "final"), str(p))
    kind = weights_kind(p)
    if kind:
        run = p.parent if p.name == "final" else p
        return ModelChoice(f"{run.name}/{p.name} ({kind})", run_base_model(run), str(p), kind, str(run))
    from flowalign import checkpoint

    if checkpoint.is_checkpoint(p):  # a full fine-tuning run's checkpoints/iter_N
        run = p.parent.parent
        return ModelChoice(f"{run.name}/{p.name} (checkpoint)", run_base_model(run), str(p), "full", str(run))
    raise DemoError(f"{path.strip()}: no trained weights here (expected a run directory with final/, a final/ "
                    f"directory holding LoRA .safetensors or transformer/, or a pipeline with model_index.json)")


class ModelCache:
    """Loaded adapters by (base, weights), least recently used dropped past ``max_models``; loading is locked so two
    callbacks never load the same model twice."""

    def __init__(self, max_models: int = 6):
        self.max_models = max_models
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a model was actually read from disk

    def get(self, choice: ModelChoice):
        from flowalign.trainer import resolve_model_path

        key = (resolve_model_path(choice.base), choice.weights)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            with LOAD_LOCK:
                adapter = self._load(choice, key[0])
            self._models[key] = adapter
            self.loads += 1
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return adapter

    @staticmethod
    def _load(choice: ModelChoice, base_path: str):
        from diffusers.utils import logging as dlog

        from flowalign.pipelines.base import load_adapter

        from transformers.utils import logging as tlog

        for lg in (dlog, tlog):  # the server's log is for requests and errors, not loading bars
            lg.disable_progress_bar()
            lg.set_verbosity_error()
        try:
            adapter = load_adapter(base_path)
        except Exception as e:  # any loading failure is the user's checkpoint, shown in the page
            raise DemoError(f"could not load the base model {choice.base!r} of {choice.label}: {first_line(e)}") \
                from None
        if choice.weights:
            try:
                adapter.load_trained(choice.weights)
            except Exception as e:
                raise DemoError(f"could not load the trained weights of {choice.label} ({choice.weights}): "
                                f"{first_line(e)}") from None
        adapter.denoiser.eval()
        return adapter


# ================================================================================================ prompts
def task_names() -> list[str]:
    from flowalign.eval.benchmark import TASK_ORDER

    return list(TASK_ORDER)


_TEST_RECORDS: list[dict] | None = None


def test_records() -> list[dict]:
    """The ShapeWorld test split (GenEval metadata records)."""
    global _TEST_RECORDS
    if _TEST_RECORDS is None:
        from flowalign.eval.geneval import load_metadata
        from flowalign.shapeworld.prompts import prompt_file

        _TEST_RECORDS = load_metadata(prompt_file("test"))
    return _TEST_RECORDS


def task_prompts(task: str) -> list[str]:
    """The distinct prompts of one task of the test split, in file order."""
    seen = OrderedDict()
    for r in test_records():
        if r["tag"] == task:
            seen.setdefault(r["prompt"], None)
    if not seen:
        raise DemoError(f"unknown task {task!r}; tasks: {', '.join(task_names())}")
    return list(seen)


def record_for(prompt: str) -> dict | None:
    """The benchmark record of a prompt: the test split first, then every ShapeWorld split; None for free text."""
    for r in test_records():
        if r["prompt"] == prompt:
            return dict(r)
    from flowalign.noise import metadata_for_prompt

    return metadata_for_prompt(prompt)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoError("the prompt is empty: type one, or pick a benchmark prompt")
    return " ".join(prompt.split())


def check_int(name: str, v, lo: int, hi: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a whole number, got {v!r}") from None
    if not math.isfinite(f) or f != int(f) or not lo <= f <= hi:
        raise DemoError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
    return int(f)


def check_float(name: str, v, lo: float, hi: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or not lo <= f <= hi:
        raise DemoError(f"{name} must be between {lo} and {hi}, got {v!r}")
    return f


# ================================================================================================ rewards
class RewardBank:
    """Every registry reward that builds on this machine (tried once, lazily); ``unavailable`` says why the others
    did not (e.g. hub weights offline)."""

    def __init__(self, names: list[str] | None = None):
        self._names = names
        self._lock = threading.Lock()
        self.available: OrderedDict[str, object] | None = None
        self.unavailable: dict[str, str] = {}

    def load(self) -> "RewardBank":
        with self._lock, LOAD_LOCK:
            if self.available is not None:
                return self
            from flowalign.rewards import build_reward, known_rewards

            from flowalign.rewards.base import RewardError

            avail = OrderedDict()
            for name in self._names or known_rewards():
                for attempt in (0, 1):
                    try:
                        avail[name] = build_reward(name)
                        self.unavailable.pop(name, None)
                        break
                    except RewardError as e:  # weights not on this machine (a hub id offline): listed, not fatal
                        self.unavailable[name] = first_line(e)
                        break
                    except Exception as e:  # anything else may be transient (a lazy import racing another
                        # thread's): one more try, then listed
                        self.unavailable[name] = f"{type(e).__name__}: {first_line(e)}"
                        log.warning("reward %s failed to build (attempt %d): %s", name, attempt + 1,
                                    self.unavailable[name])
            self.available = OrderedDict((n, avail[n]) for n in sorted(avail))
            for name, why in self.unavailable.items():
                log.info("reward %s is not available: %s", name, why)
        return self


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"


def describe_detections(dets) -> str:
    """'red circle (0.31, 0.52), blue square? (0.70, 0.40)': colour, shape and centroid of each object; '?' marks an
    ambiguous one (the strict verdicts do not count it)."""
    if not dets:
        return "nothing"
    parts = []
    for d in sorted(dets, key=lambda d: (d.centroid[0], d.centroid[1])):
        mark = "" if getattr(d, "unambiguous", True) else "?"
        parts.append(f"{d.color} {d.cls}{mark} ({d.centroid[0]:.2f}, {d.centroid[1]:.2f})")
    return ", ".join(parts)


def score_table(images: np.ndarray, prompt: str, record: dict | None, bank: RewardBank,
                columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """A table of every score of each image (uint8 (B, H, W, 3), one column each): the four ShapeWorld judges'
    verdicts (for a benchmark record), what the two detectors saw, and every available registry reward (its
    ``reward`` and extra outputs). Returns (headers, rows) of strings."""
    from flowalign.eval.judges import JUDGES, verdicts
    from flowalign.rewards.base import RewardError
    from flowalign.shapeworld import detector, geometry_judge

    bank.load()
    B = len(images)
    rows: list[list[str]] = []
    if record is not None and "include" in record:
        vs = [verdicts(record, im) for im in images]
        for j in ("heldout_strict",) + tuple(x for x in JUDGES if x != "heldout_strict"):
            rows.append([f"verdict: {JUDGE_LABELS.get(j, j)}"] +
                        [("✓ correct" if v[j][0] else "✗ wrong") + f" (partial {v[j][1]:.2f})" for v in vs])
    else:
        rows.append(["verdict"] + ["– (free text: no benchmark record to judge)"] * B)
    rows.append(["detected (training judge)"] + [describe_detections(detector.detect(im)) for im in images])
    rows.append(["detected (held-out judge)"] + [describe_detections(geometry_judge.detect(im)) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    prompts = [prompt] * B
    shown_extras: dict[str, list[str]] = {}
    order = sorted(bank.available, key=lambda n: (REWARD_ORDER.index(n) if n in REWARD_ORDER else len(REWARD_ORDER),
                                                  n))
    for name in order:
        reward = bank.available[name]
        if getattr(reward, "group_scope", False):
            rows.append([f"{name} (group reward: scores several samples of one prompt together)"] + ["–"] * B)
            continue
        if reward.needs_metadata and record is None:
            rows.append([f"{name} (needs a benchmark record)"] + ["–"] * B)
            continue
        try:
            with torch.no_grad():
                out = reward(x, prompts, [record] * B if reward.needs_metadata else None)
        except (RewardError, ValueError) as e:
            why = first_line(e).removeprefix(f"{name} reward: ")
            rows.append([f"{name} (n/a: {why[:80]})"] + ["–"] * B)
            continue
        rows.append([name] + [_fmt(float(v)) for v in out["reward"]])
        for k, vals in out.items():
            if k == "reward" or vals.shape != (B,):  # per-image scalars only (not embeddings)
                continue
            cells = [_fmt(float(v)) for v in vals]
            if shown_extras.get(k) == cells:  # e.g. size_kb of both JPEG rewards
                continue
            shown_extras[k] = cells
            rows.append([f"{name}: {k}"] + cells)
    return ["score"] + list(columns), rows


def upscale(img: np.ndarray, side: int = DISPLAY_SIDE) -> Image.Image:
    """A uint8 HxWx3 image enlarged with nearest-neighbour (ShapeWorld images are 32 px)."""
    im = Image.fromarray(img)
    if im.width < side:
        im = im.resize((side, side * im.height // im.width), Image.NEAREST)
    return im


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    from flowalign.rewards import to_uint8

    return to_uint8(images)


# ================================================================================================ compare tab
@dataclass
class CompareResult:
    images: list[tuple[Image.Image, str]]     # (image, caption) per model
    headers: list[str]
    rows: list[list[str]]
    message: str
    raw: np.ndarray | None = None             # (M, H, W, 3) uint8 at the model's resolution


class Demo:
    """The demo's state: where runs live, the model cache, the reward bank, the noise jobs."""

    def __init__(self, runs_dir="runs", base: str = BASE_MODEL, max_models: int = 6, rewards: list[str] | None = None):
        self.runs_dir = Path(runs_dir).expanduser()
        self.base = base
        self.cache = ModelCache(max_models)
        self.bank = RewardBank(rewards)
        self.jobs: dict[str, "NoiseJob"] = {}
        self._jobs_lock = threading.Lock()
        self.run_lock = threading.Lock()  # one model job at a time (CPU)

    # ------------------------------------------------------------------------- models
    def choices(self) -> "OrderedDict[str, ModelChoice]":
        return model_choices(self.runs_dir, self.base)

    def model_labels(self) -> list[str]:
        return list(self.choices())

    def default_models(self) -> list[str]:
        """The base and one trained run: main_s0 (the main job) when there is one, else the latest trained."""
        ch = list(self.choices().values())
        trained = [c for c in ch[1:] if c.label.startswith("main_s0 ")]
        if not trained and len(ch) > 1:
            trained = [max(ch[1:], key=lambda c: Path(c.weights).stat().st_mtime)]
        return [ch[0].label] + [c.label for c in trained]

    def rescan(self, selected=None) -> tuple[list[str], list[str], list[str], str]:
        """After runs finished: (model labels, the selection kept -- topped up with the defaults when fewer than two
        remain --, run names for the runs tab, a message)."""
        labels = self.model_labels()
        keep = [s for s in (selected or []) if s in labels]
        if len(keep) < 2:
            keep += [d for d in self.default_models() if d not in keep]
        return labels, keep, list_runs(self.runs_dir), f"found {len(labels) - 1} trained run(s) in {self.runs_dir}"

    def resolve(self, labels, extra_path: str = "") -> list[ModelChoice]:
        ch = self.choices()
        out = []
        by_run = {c.label.rsplit(" (", 1)[0]: c for c in list(ch.values())[1:]}
        for lab in labels or []:
            lab = str(lab).strip()
            if lab in ch:
                out.append(ch[lab])
            elif lab in by_run:  # a run's name typed without its "(kind)"
                out.append(by_run[lab])
            else:  # a label from an older scan, or a path typed into the dropdown
                out.append(choice_from_path(lab, self.base))
        for p in [s for s in (extra_path or "").replace("\n", ",").split(",") if s.strip()]:
            out.append(choice_from_path(p, self.base))
        return out

    def warm_up(self) -> None:
        """Load the base model and try every reward once (run in a background thread at start-up)."""
        _, err = guard(self.cache.get, ModelChoice(f"base ({self.base})", self.base))
        if err:
            log.warning("warm-up: %s", err)
        self.bank.load()

    # ------------------------------------------------------------------------- compare
    def compare(self, prompt, seed, labels, extra_path="", steps=20, guidance=2.0) -> CompareResult:
        """Images of every chosen model for one prompt and seed, with the table of scores."""
        from flowalign.eval.benchmark import generate

        prompt = check_prompt(prompt)
        seed = check_int("seed", seed, 0, 2 ** 31 - 1)
        steps = check_int("sampling steps", steps, 1, 200)
        guidance = check_float("guidance", guidance, 0.0, 30.0)
        models = self.resolve(labels, extra_path)
        if len(models) < 1:
            raise DemoError("choose at least one model (two or more to compare)")
        record = record_for(prompt)
        imgs, names = [], []
        t0 = time.perf_counter()
        with self.run_lock:
            for m in models:
                adapter = self.cache.get(m)
                imgs.append(generate(adapter, [prompt], steps, guidance, seed)[0])
                names.append(m.label)
        seconds = time.perf_counter() - t0
        if len({im.shape for im in imgs}) > 1:
            raise DemoError("the chosen models make images of different sizes: compare models of one base")
        raw = np.stack(imgs)
        headers, rows = score_table(raw, prompt, record, self.bank, names)
        where = (f"benchmark record: task **{record['tag']}**" if record else
                 "free text (not a ShapeWorld benchmark prompt: no verdict)")
        msg = (f"{len(models)} model(s), seed {seed}, {steps} steps, CFG {guidance:g}, {seconds:.1f} s; {where}. "
               f"Seed s gives the image the benchmark gives record s (noise of `Generator(s)`).")
        if self.bank.unavailable:
            msg += f" Rewards not available offline here: {', '.join(sorted(self.bank.unavailable))}."
        captions = [f"{n}" for n in names]
        return CompareResult([(upscale(im), c) for im, c in zip(imgs, captions)], headers, rows, msg, raw)

    # ------------------------------------------------------------------------- noise jobs
    def start_noise(self, key: str, prompt, label, method, reward_spec, budget, seed=0, steps=20,
                    guidance=2.0) -> "NoiseJob":
        """Validate, start ``noise.optimize`` in a worker thread and return its job (``key``: one per session)."""
        from flowalign import noise

        prompt = check_prompt(prompt)
        seed = check_int("seed", seed, 0, 2 ** 31 - 1)
        steps = check_int("sampling steps", steps, 1, 200)
        guidance = check_float("guidance", guidance, 0.0, 30.0)
        budget = check_int("budget (NFE per prompt)", budget, 1, 1_000_000)
        method = noise.canonical_method(method or "")
        items = [s for s in str(reward_spec or "").replace(",", " ").split() if s]
        if not items:
            raise DemoError("choose at least one reward (e.g. shapeclip, or shapeclip=1 artifact=0.1)")
        spec = noise.parse_reward_args(items)
        with LOAD_LOCK:
            reward = noise.resolve_reward(spec)
        if method in ("reno", "carinox"):
            noise.check_differentiable(reward, method)
        record = record_for(prompt)
        if reward.needs_metadata and record is None:
            raise DemoError(f"reward {reward_spec!r} needs a benchmark record: pick a ShapeWorld prompt, or use a "
                            f"reward that reads only the image and prompt (e.g. shapeclip)")
        choice = self.resolve([label])[0] if label else ModelChoice(f"base ({self.base})", self.base)
        adapter = self.cache.get(choice)
        with self._jobs_lock:
            old = self.jobs.get(key)
            if old is not None and old.running:
                raise DemoError("a noise-optimisation job is already running in this page: stop it first")
            job = NoiseJob(self, adapter, prompt, record, reward, method, budget, seed, steps, guidance, choice)
            self.jobs[key] = job
        job.start()
        return job

    def stop_noise(self, key: str) -> str:
        job = self.jobs.get(key)
        if job is None or not job.running:
            return "no job is running"
        job.stop.set()
        return "stopping: the job ends after its current iteration"


@dataclass
class NoiseEvent:
    phase: str
    step: int
    total: int
    reward: float
    best: float
    image: np.ndarray
    nfe: int
    t: float


@dataclass
class NoiseJob:
    """One ``noise.optimize`` run in a worker thread; progress arrives on ``events``; ``stop`` ends it early."""
    demo: Demo
    adapter: object
    prompt: str
    record: dict | None
    reward: object
    method: str
    budget: int
    seed: int
    steps: int
    guidance: float
    choice: ModelChoice
    events: "queue.Queue" = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    history: list = field(default_factory=list)
    result: object = None
    error: str | None = None
    base_image: np.ndarray | None = None
    running: bool = False
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def start(self) -> None:
        self.running = True
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="flowalign-noise")
        self._thread.start()

    def _callback(self, p) -> bool:
        self.events.put(NoiseEvent(p.phase, p.step, p.total, float(p.reward[0]), float(p.best[0]),
                                   tensor_to_uint8(p.images[:1])[0], p.nfe, time.perf_counter() - self._t0))
        return self.stop.is_set()

    def _run(self) -> None:
        from flowalign import noise
        from flowalign.eval.benchmark import generate

        try:
            with self.demo.run_lock:
                self.base_image = generate(self.adapter, [self.prompt], self.steps, self.guidance, self.seed)[0]
                meta = [self.record] if self.record is not None else None
                self.result = noise.optimize(self.adapter, [self.prompt], self.reward, self.method, self.budget,
                                             self.seed, metadata=meta, guidance=self.guidance,
                                             num_steps=self.steps, indices=[0], callback=self._callback)
        except Exception as e:  # shown in the page; the traceback in the log
            from flowalign.noise import NoiseOptError
            from flowalign.rewards.base import RewardError

            if not isinstance(e, (NoiseOptError, RewardError, DemoError)):
                log.error("noise job failed:\n%s", traceback.format_exc())
                self.error = f"internal error ({type(e).__name__}): {first_line(e)}"
            else:
                self.error = str(e)
        finally:
            self.running = False
            self.events.put(None)

    def updates(self, timeout: float = 600.0):
        """Yield each NoiseEvent as it arrives (appended to ``history``), until the job ends."""
        deadline = time.perf_counter() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.perf_counter()))
            except queue.Empty:
                self.stop.set()
                self.error = self.error or f"the job took longer than {timeout:.0f} s and was stopped"
                return
            if ev is None:
                return
            self.history.append(ev)
            yield ev

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> str:
        label = METHOD_LABELS.get(self.method, self.method)
        if self.error:
            return f"**error:** {self.error}"
        if self.result is None:
            if not self.history:
                return f"{label}: starting…"
            ev = self.history[-1]
            return (f"{label}: {ev.phase} {ev.step + 1}/{ev.total}, reward {ev.reward:.3f} (best {ev.best:.3f}), "
                    f"{ev.nfe} NFE, {ev.t:.1f} s" + (" — stopping…" if self.stop.is_set() else ""))
        r = self.result
        stopped = r.info.get("stopped_early")
        return (f"{label} {'stopped early' if stopped else 'done'}: reward {float(r.rewards['reward'][0]):.3f} "
                f"(the base sample of this seed: {self.base_reward():.3f}), {r.nfe} NFE of a budget of "
                f"{self.budget}, {r.seconds:.1f} s. The image is the chosen noise rendered with the full sampler "
                f"({self.steps} steps).")

    def base_reward(self) -> float:
        x = torch.from_numpy(self.base_image[None]).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            out = self.reward(x, [self.prompt], [self.record] if self.reward.needs_metadata else None)
        return float(out["reward"][0])

    def final_image(self) -> np.ndarray | None:
        return None if self.result is None else tensor_to_uint8(self.result.images[:1])[0]

    def final_table(self) -> tuple[list[str], list[list[str]]]:
        """Scores of the base sample and the optimised image, side by side."""
        imgs = np.stack([self.base_image, self.final_image()])
        return score_table(imgs, self.prompt, self.record, self.demo.bank,
                           ["base sample (same seed)", f"after {METHOD_LABELS.get(self.method, self.method)}"])


def curve_image(history: list[NoiseEvent], method: str, reference: float | None = None, width: float = 5.6,
                height: float = 3.2) -> Image.Image:
    """The reward of every iteration so far (and the best so far) as a PNG image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    x = np.arange(1, len(history) + 1)
    if history:
        phases = OrderedDict()
        for i, ev in enumerate(history):
            phases.setdefault(ev.phase, []).append(i)
        colors = {"candidate": "#1f77b4", "iterate": "#1f77b4", "explore": "#9467bd", "resample": "#2ca02c"}
        for ph, idx in phases.items():
            ax.plot(x[idx], [history[i].reward for i in idx], "o-", ms=3, lw=1.2, color=colors.get(ph, "#1f77b4"),
                    label={"candidate": "candidate", "iterate": "iterate (few-step preview)",
                           "explore": "exploration (preview)", "resample": "particles' mean"}.get(ph, ph))
        ax.plot(x, np.maximum.accumulate([ev.best for ev in history]), color="#d62728", lw=1.6, label="best so far")
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="#555", ls="--", lw=1, label="base sample")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel({"best_of_n": "candidate", "reno": "iteration", "fk": "resampling step",
                   "carinox": "exploration candidate, then iteration"}.get(method, "step"))
    ax.set_ylabel("reward")
    ax.set_title(f"{METHOD_LABELS.get(method, method)}: reward per step", fontsize=10)
    ax.grid(alpha=0.3)
    if history or reference is not None:
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# ================================================================================================ runs tab
RUN_IMAGES = (("reward_curve.png", "reward curve"), ("compare_test.png", "base vs trained: test prompts"),
              ("compare_unseen.png", "base vs trained: unseen prompts"), ("samples/base.png", "samples: base"),
              ("samples/final.png", "samples: trained"), ("samples/audit_base.png", "judge audit: base"),
              ("samples/audit_final.png", "judge audit: trained"))


def list_runs(runs_dir) -> list[str]:
    """Runs under ``runs_dir`` (depth 1 or 2) that wrote a report, a reward curve or final weights."""
    runs_dir = Path(runs_dir).expanduser()
    marks = ("report.md", "reward_curve.png", "final")
    return [d.relative_to(runs_dir).as_posix() for d in _run_dirs(runs_dir, lambda e: any((e / m).exists()
                                                                                            for m in marks))]


@dataclass
class RunView:
    images: list[tuple[str, str]]  # (path, caption)
    report: str
    summary: str


def run_view(runs_dir, name: str) -> RunView:
    """A run's plots and sample grids (the PNGs the trainer writes) and its report.md."""
    if not name or not str(name).strip():
        raise DemoError("choose a run")
    runs_dir = Path(runs_dir).expanduser()
    d = Path(name).expanduser()
    if not d.is_absolute():
        d = runs_dir / name
    if not d.is_dir():
        raise DemoError(f"no such run directory: {d}")
    imgs = []
    for rel, cap in RUN_IMAGES:
        if (d / rel).is_file():
            imgs.append((str(d / rel), cap))
    for p in sorted((d / "samples").glob("*.png")) if (d / "samples").is_dir() else []:
        if str(p) not in {i[0] for i in imgs}:
            imgs.append((str(p), f"samples: {p.stem}"))
    report = (d / "report.md").read_text() if (d / "report.md").is_file() else "_this run has no report.md yet_"
    bits = [f"`{d}`"]
    try:
        cfg = json.loads((d / "config.json").read_text())
        alg = cfg.get("algorithm", {}).get("name")
        lora = cfg.get("model", {}).get("lora", {}).get("enabled")
        bits.append(f"algorithm **{alg}**, {'LoRA' if lora else 'full fine-tuning'}, base `{run_base_model(d)}`")
    except (OSError, ValueError, AttributeError):
        pass
    kind = weights_kind(d / "final")
    bits.append(f"trained weights: `final/` ({kind})" if kind else "no final/ weights yet")
    if not imgs:
        bits.append("no plots yet")
    return RunView(imgs, report, " · ".join(bits))
