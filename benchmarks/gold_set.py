"""The hand-labelled gold set of generated ShapeWorld images (tests/fixtures/gold/): build it from label files,
draw its labelling grids, or regenerate its images from their sources.

A source is a model, a guidance scale and a block of records of a prompt file: record ``i`` of the prompt file is
sampled from ``Generator(seed + i)`` with ``eval.benchmark.generate`` (20 ODE steps), exactly as the benchmark does.
A label file (``labels/<source>__<task>.txt``) has one line per image: ``<record> <0|1> [?] [note]``, written while
looking at the grids (``?``: unsure, kept in the set and counted, reported apart in docs/judging.md).

usage:
  python benchmarks/gold_set.py grids   [--gold DIR] [--out DIR]     # 6x5 grids, x6, prompt under each image
  python benchmarks/gold_set.py build   [--gold DIR]                 # generate the images of every label line
  python benchmarks/gold_set.py regenerate [--gold DIR]              # regenerate and compare with images.npz
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "tests" / "fixtures" / "gold"
# source name -> (model, trained checkpoint or None, guidance, prompt file)
SOURCES = {
    "base_cfg3": ("shapeworld", None, 3.0, "shapeworld:test"),
    "base_cfg1.5": ("shapeworld", None, 1.5, "shapeworld:test"),
    "trained_cfg3": ("shapeworld", "runs/gold_trained/final", 3.0, "shapeworld:test"),
}
STEPS, SEED = 20, 1000


def read_labels(directory: Path) -> list[dict]:
    out = []
    for f in sorted((directory / "labels").glob("*.txt")):
        source = f.stem.split("__")[0]
        if source not in SOURCES:
            raise ValueError(f"{f.name}: unknown source {source!r}; known: {', '.join(SOURCES)}")
        for n, line in enumerate(f.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 2)
            if len(parts) < 2 or parts[1] not in ("0", "1") or not parts[0].isdigit():
                raise ValueError(f"{f.name}:{n}: want '<record> <0|1> [?] [note]', got {line!r}")
            rest = parts[2] if len(parts) > 2 else ""
            out.append({"source": source, "record": int(parts[0]), "gold": parts[1] == "1",
                        "unsure": rest.startswith("?"), "note": rest.lstrip("?").strip()})
    if not out:
        raise ValueError(f"no label lines in {directory / 'labels'}")
    return out


def generate_source(source: str, records: list[int]) -> np.ndarray:
    """The images of some records of one source: the whole prompt file generated as ``eval.benchmark.evaluate``
    does (batches of 200, record i from Generator(SEED + i)), so they are the benchmark's own images."""
    from flowalign.eval.benchmark import generate, resolve_prompts
    from flowalign.eval.geneval import load_metadata
    from flowalign.pipelines.base import load_adapter
    from flowalign.shapeworld import MODEL_DIR

    model, trained, guidance, prompts = SOURCES[source]
    metas = load_metadata(resolve_prompts(prompts))
    ad = load_adapter(str(MODEL_DIR) if model == "shapeworld" else model)
    if trained:
        path = ROOT / trained
        if not path.exists():
            raise FileNotFoundError(f"source {source}: trained checkpoint not found: {path}")
        ad.load_trained(str(path))
    return generate(ad, [m["prompt"] for m in metas], STEPS, guidance, SEED, batch_size=200)[records]


def build(directory: Path) -> None:
    from flowalign.eval.benchmark import resolve_prompts
    from flowalign.eval.geneval import load_metadata

    labels = read_labels(directory)
    images, recs = [], []
    for source in SOURCES:
        rows = [x for x in labels if x["source"] == source]
        if not rows:
            continue
        model, trained, guidance, prompts = SOURCES[source]
        metas = load_metadata(resolve_prompts(prompts))
        images.append(generate_source(source, [x["record"] for x in rows]))
        for x in rows:
            recs.append({"id": len(recs), **x, "model": model, "trained": trained, "guidance": guidance,
                         "num_steps": STEPS, "seed": SEED, "prompts": prompts, "metadata": metas[x["record"]]})
    np.savez_compressed(directory / "images.npz", images=np.concatenate(images))
    (directory / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} gold images to {directory}")


def regenerate(directory: Path) -> None:
    from flowalign.eval.judges import load_gold

    recs, images = load_gold(directory)
    for source in SOURCES:
        rows = [r for r in recs if r["source"] == source]
        if not rows:
            continue
        try:
            again = generate_source(source, [r["record"] for r in rows])
        except FileNotFoundError as e:
            print(f"{source}: skipped ({e})")
            continue
        diff = np.abs(again.astype(int) - images[[r["id"] for r in rows]].astype(int))
        print(f"{source}: {len(rows)} images, identical {int((diff.reshape(len(rows), -1).max(1) == 0).sum())}, "
              f"max pixel difference {int(diff.max())}")


def grids(directory: Path, out: Path, cols: int = 6, rows: int = 5, scale: int = 6) -> None:
    from PIL import Image, ImageDraw

    from flowalign.eval.benchmark import _font
    from flowalign.eval.judges import load_gold

    recs, images = load_gold(directory)
    out.mkdir(parents=True, exist_ok=True)
    font, S, th = _font(13), 32 * scale, 34
    per = cols * rows
    for k in range(0, len(recs), per):
        chunk = recs[k:k + per]
        G = Image.new("RGB", (cols * (S + 8), rows * (S + th + 8)), (255, 255, 255))
        d = ImageDraw.Draw(G)
        for n, r in enumerate(chunk):
            y, x = divmod(n, cols)
            x, y = x * (S + 8) + 4, y * (S + th + 8) + 4
            G.paste(Image.fromarray(images[r["id"]]).resize((S, S), Image.NEAREST), (x, y))
            text = f"{r['id']}: {r['metadata']['prompt'].removeprefix('a photo of ')}"
            d.text((x, y + S + 1), "\n".join(textwrap.wrap(text, 30)[:2]), fill=(0, 0, 0), font=font)
        G.save(out / f"gold_{k // per:02d}.png")
    print(f"wrote {(len(recs) + per - 1) // per} grids to {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["grids", "build", "regenerate"])
    ap.add_argument("--gold", default=str(GOLD))
    ap.add_argument("--out", default="runs/gold_grids")
    a = ap.parse_args()
    try:
        d = Path(a.gold)
        {"grids": lambda: grids(d, Path(a.out)), "build": lambda: build(d), "regenerate": lambda: regenerate(d)}[a.cmd]()
    except (FileNotFoundError, ValueError) as e:
        print(f"gold_set: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
