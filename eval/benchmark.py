"""Generate images for a benchmark's prompts with an adapter and score them.

``evaluate(adapter, metadata, ...)``: record i is always sampled from the noise of ``Generator(seed + i)``, with the
deterministic ODE sampler, so the same model gives the same images whatever the batch size, and base and trained
models are compared on identical noises.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .geneval import load_metadata, score_images, summarize

BENCHMARKS = {"shapeworld-geneval": "shapeworld:test", "shapeworld-geneval-unseen": "shapeworld:test_unseen"}
TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def resolve_prompts(spec: str) -> Path:
    """'shapeworld:<name>' -> a shipped prompt file; a benchmark name -> its file; else a path."""
    from flowalign.shapeworld.prompts import prompt_file

    if spec in BENCHMARKS:
        spec = BENCHMARKS[spec]
    if spec.startswith("shapeworld:"):
        return prompt_file(spec.split(":", 1)[1])
    return Path(spec)


def benchmark_metadata(name: str) -> list[dict]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return load_metadata(resolve_prompts(name))


def subsample(metadata: list[dict], n_per_task: int | None) -> list[dict]:
    if not n_per_task:
        return metadata
    seen: dict[str, int] = {}
    out = []
    for m in metadata:
        if seen.get(m["tag"], 0) < n_per_task:
            out.append(m)
            seen[m["tag"]] = seen.get(m["tag"], 0) + 1
    return out


@torch.no_grad()
def generate(adapter, prompts: list[str], num_steps: int, guidance: float, seed: int, batch_size: int = 200,
             progress: bool = False) -> np.ndarray:
    from flowalign.rollout import sample_ode

    out = []
    rng = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="eval", leave=False)
    for i in rng:
        chunk = prompts[i:i + batch_size]
        x = torch.cat([adapter.init_noise(1, torch.Generator().manual_seed(seed + i + j)) for j in range(len(chunk))])
        cond = adapter.encode(chunk, negative="" if guidance > 1 else None)
        imgs = sample_ode(adapter, cond, num_steps, guidance, x.to(adapter.device))
        out.append((imgs.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate(adapter, metadata: list[dict], num_steps: int = 20, guidance: float = 2.0, seed: int = 1000,
             batch_size: int = 200, detector=None, progress: bool = False, scorer=None) -> tuple[dict, np.ndarray]:
    """scorer(metadata, images) -> [(correct, partial)] replaces the GenEval rules + detector when given."""
    images = generate(adapter, [m["prompt"] for m in metadata], num_steps, guidance, seed, batch_size, progress)
    if scorer is None:
        res = score_images(metadata, images, detector)
    else:
        res = summarize([{"tag": m["tag"], "prompt": m["prompt"], "correct": c, "partial": p}
                         for m, (c, p) in zip(metadata, scorer(metadata, images))])
    res.update(num_steps=num_steps, guidance=guidance, seed=seed)
    return res, images


def format_table(columns: dict[str, dict], tasks=TASK_ORDER) -> str:
    """columns: name -> result dict (with per_task and overall). Markdown table, tasks as rows."""
    names = list(columns)
    tasks = [t for t in tasks if any(t in c["per_task"] for c in columns.values())]
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{c['per_task'].get(t, float('nan')):.3f}" for c in columns.values()) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{c['overall']:.3f}**" for c in columns.values()) + " |")
    return "\n".join(lines)


def save_grid(images: np.ndarray, metadata: list[dict], path, per_task: int = 8, scale: int = 3) -> Path:
    """One row per task (first ``per_task`` images of each), upscaled, with the verdicts as coloured borders
    when ``metadata`` entries carry 'correct'."""
    rows = []
    for t in TASK_ORDER:
        idx = [i for i, m in enumerate(metadata) if m["tag"] == t][:per_task]
        if not idx:
            continue
        tiles = []
        for i in idx:
            im = Image.fromarray(images[i]).resize((images.shape[1] * scale,) * 2, Image.NEAREST)
            tile = Image.new("RGB", (im.width + 4, im.height + 4), (255, 255, 255))
            ok = metadata[i].get("correct")
            if ok is not None:
                ImageDraw.Draw(tile).rectangle([0, 0, tile.width - 1, tile.height - 1],
                                               fill=(40, 170, 40) if ok else (200, 40, 40))
            tile.paste(im, (2, 2))
            tiles.append(np.asarray(tile))
        while len(tiles) < per_task:
            tiles.append(np.full_like(tiles[0], 255))
        rows.append(np.concatenate(tiles, 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run(model: str, benchmark: str, out_dir, num_steps: int = 20, guidance: float = 2.0, seed: int = 1000,
        n_per_task: int | None = None, batch_size: int = 200, lora: str | None = None) -> dict:
    """`flowalign eval`: load, generate, score, write JSON + sample grid; returns the result. ``lora``: a run's
    ``final/`` directory (LoRA weights or a full ``transformer/``) applied on top of ``model``."""
    from flowalign.pipelines.base import load_adapter

    metadata = subsample(benchmark_metadata(benchmark), n_per_task)
    adapter = load_adapter(model)
    if lora:
        adapter.load_trained(lora)
    res, images = evaluate(adapter, metadata, num_steps, guidance, seed, batch_size, progress=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res.update(model=str(model), benchmark=benchmark, lora=lora)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    metas = [dict(m, correct=r["correct"]) for m, r in zip(metadata, res["per_image"])]
    save_grid(images, metas, out / "samples.png")
    return res
