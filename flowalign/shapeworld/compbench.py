"""ShapeWorld prompt files in T2I-CompBench's own layout: one text file per category, one prompt a line
(``color_val.txt``, ``shape_val.txt``, ``spatial_val.txt``, ``non_spatial_val.txt``, ``complex_val.txt``), under
``data/compbench/``. Every prompt uses only the ShapeWorld vocabulary (the shipped text encoders know no other word).

- ``color`` (attribute binding, colour): ``a photo of a {c1} {s1} and a {c2} {s2}``, two shapes, two colours
  (the training distribution's colour-attribute combinations);
- ``shape`` (attribute binding, shape): ``a photo of a {c} {s1} and a {c} {s2}``: one colour, two shapes, so the
  shapes are what must be bound to the two objects (never seen in training: the colours there always differ);
- ``spatial`` (2-D): ``a photo of a {s1} {relation} a {s2}``, relation left of / right of / above / below;
- ``non_spatial``: relations that are not spatial, the only two the vocabulary has: co-occurrence (``a photo of
  a {s1} and a {s2}``) and number (``a photo of {n} {shapes}``);
- ``complex`` (several clauses: attributes and a relation): ``a photo of a {c1} {s1} {relation} a {c2} {s2}``
  (never seen in training).
ShapeWorld has no textures, so there is no ``texture`` file. Prompts are drawn without replacement with a fixed
seed; ``write_compbench_files`` regenerates the shipped files exactly (a test checks).
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from .world import COLORS, NUMBERS, PLURAL, RELATIONS, SHAPES

COMPBENCH_DIR = Path(__file__).parent / "data" / "compbench"
CATEGORIES = ("color", "shape", "spatial", "non_spatial", "complex")
PROMPTS_PER_CATEGORY = 25


def category_pools() -> dict[str, list[str]]:
    """Every prompt of every category (sorted, deterministic)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    cols = list(COLORS)
    return {
        "color": [f"a photo of a {ca} {a} and a {cb} {b}" for a, b in pairs
                  for ca, cb in itertools.permutations(cols, 2)],
        "shape": [f"a photo of a {c} {a} and a {c} {b}" for a, b in pairs for c in cols],
        "spatial": [f"a photo of a {a} {r} a {b}" for a, b in pairs for r in RELATIONS],
        "non_spatial": [f"a photo of a {a} and a {b}" for a, b in pairs]
                       + [f"a photo of {NUMBERS[n]} {PLURAL[s]}" for s in SHAPES for n in NUMBERS],
        "complex": [f"a photo of a {ca} {a} {r} a {cb} {b}" for a, b in pairs for r in RELATIONS
                    for ca, cb in itertools.permutations(cols, 2)],
    }


def compbench_prompts(seed: int = 0, n: int = PROMPTS_PER_CATEGORY) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for cat, pool in category_pools().items():
        out[cat] = rng.sample(pool, min(n, len(pool)))
    return out


def write_compbench_files(out_dir=COMPBENCH_DIR, seed: int = 0, n: int = PROMPTS_PER_CATEGORY) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cat, prompts in compbench_prompts(seed, n).items():
        p = out_dir / f"{cat}_val.txt"
        p.write_text("".join(q + "\n" for q in prompts))
        paths[cat] = p
    return paths


if __name__ == "__main__":
    for c, p in write_compbench_files().items():
        print(c, p)
