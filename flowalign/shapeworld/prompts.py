"""Deterministic GenEval-format prompt files for ShapeWorld.

- ``train_metadata.jsonl``: every distinct prompt of the *seen* combinations (what pre-training and RL see).
- ``test_metadata.jsonl``: ``n_per_task`` records per task drawn from the seen combinations; for the tasks
  with few distinct prompts (single_object 4, two_object 12, counting 12) held-out means new seeds.
- ``test_unseen_metadata.jsonl``: colour-attribute and position prompts whose combinations (shape pair and
  colour pair / shape pair and relation) never appear in training: a generalisation split, reported apart.
Record ``i`` of a test file is always generated with seed ``eval_seed + i``.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from .world import COLORS, NUMBERS, RELATIONS, SHAPES, TASKS, make_metadata

DATA_DIR = Path(__file__).parent / "data"
HELD_OUT_FRACTION = {"color_attr": 0.2, "position": 0.25}


def all_metadata() -> dict[str, list[dict]]:
    """Every distinct prompt of every task."""
    pairs = list(itertools.permutations(SHAPES, 2))
    out = {
        "single_object": [make_metadata("single_object", shape=s) for s in SHAPES],
        "colors": [make_metadata("colors", shape=s, color=c) for s in SHAPES for c in COLORS],
        "two_object": [make_metadata("two_object", a=a, b=b) for a, b in pairs],
        "counting": [make_metadata("counting", shape=s, n=n) for s in SHAPES for n in NUMBERS],
        "color_attr": [make_metadata("color_attr", a=a, b=b, ca=ca, cb=cb) for a, b in pairs
                       for ca, cb in itertools.permutations(COLORS, 2)],
        "position": [make_metadata("position", a=a, b=b, rel=r) for a, b in pairs for r in RELATIONS],
    }
    return out


def split(seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(seen, unseen) prompts per task; the unseen ones are a seeded random subset of two tasks."""
    rng = random.Random(seed)
    seen, unseen = {}, {}
    for task, metas in all_metadata().items():
        frac = HELD_OUT_FRACTION.get(task, 0.0)
        idx = list(range(len(metas)))
        rng.shuffle(idx)
        k = round(frac * len(metas))
        held = set(idx[:k])
        seen[task] = [m for i, m in enumerate(metas) if i not in held]
        unseen[task] = [m for i, m in enumerate(metas) if i in held]
    return seen, {t: v for t, v in unseen.items() if v}


def _draw(pool: dict[str, list[dict]], n_per_task: int, rng: random.Random) -> list[dict]:
    out = []
    for task in TASKS:
        if task in pool:
            out += [rng.choice(pool[task]) for _ in range(n_per_task)]
    return out


def write_prompt_files(out_dir=DATA_DIR, seed: int = 0, n_per_task: int = 100) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen, unseen = split(seed)
    rng = random.Random(seed + 1)
    files = {
        "train": [m for t in TASKS for m in seen[t]],
        "test": _draw(seen, n_per_task, rng),
        "test_unseen": _draw(unseen, n_per_task, rng),
    }
    paths = {}
    for name, metas in files.items():
        p = out_dir / f"{name}_metadata.jsonl"
        p.write_text("".join(json.dumps(m) + "\n" for m in metas))
        paths[name] = p
    return paths


def prompt_file(name: str) -> Path:
    """Path of a shipped prompt file: 'train', 'test' or 'test_unseen'."""
    p = DATA_DIR / f"{name}_metadata.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no shipped ShapeWorld prompt file {name!r} at {p}")
    return p
