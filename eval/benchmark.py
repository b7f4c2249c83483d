"""Generate images for a benchmark's prompts with an adapter and score them.

``evaluate(adapter, metadata, ...)``: record i is always sampled from the noise of ``Generator(seed + i)``, with the
deterministic ODE sampler, so the same model gives the same images whatever the batch size, and base and trained
models are compared on identical noises.

With the default ShapeWorld judge (no ``scorer``, no ``detector``) the result also carries every verdict of
``eval.judges``: ``res["judges"]`` (``train``, ``train_strict``, ``heldout``, ``heldout_strict``: per_task, overall,
se_per_task, se_overall, n_per_task), ``res["agreement"]`` and each ``per_image`` record's ``verdicts``. The
top-level ``per_task``/``overall`` stay the training judge's lenient verdict (what the reward pays for); the
headline judge is ``heldout_strict`` (``judges.HEADLINE``). ``save_audit_grid`` draws the images on which the
judges disagree; ``format_judges_table`` tabulates the judges of several models.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .geneval import load_metadata, score_images, summarize
from .judges import HEADLINE, JUDGES, judge_all

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
    """scorer(metadata, images) -> [(correct, partial)] replaces the GenEval rules + detector when given. With neither
    (the default ShapeWorld judge) the result also holds ``judges``, ``agreement`` and per-image ``verdicts`` of all
    four judges (module docstring); ``per_task``/``overall`` are the training judge's lenient verdict either way."""
    images = generate(adapter, [m["prompt"] for m in metadata], num_steps, guidance, seed, batch_size, progress)
    if scorer is None and detector is None:
        allv = judge_all(metadata, images)
        res = summarize(allv["per_image"])
        res.update(judges=allv["judges"], agreement=allv["agreement"])
    elif scorer is None:
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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def save_audit_grid(images: np.ndarray, metadata: list[dict], per_image: list[dict], path, scale: int = 4,
                    cols: int = 8, max_images: int = 64) -> Path:
    """A PNG grid of the images on which the judges disagree (``per_image`` records from ``evaluate`` carrying
    ``verdicts``), in task order, each upscaled ``scale`` x with its prompt and every judge's verdict under it
    (``train y/n`` = lenient / strict of the training judge, ``held-out y/n`` the same of the held-out judge).
    At most ``max_images`` tiles; when the judges agree on every image the grid says so in one line."""
    import textwrap

    if len(images) != len(metadata) or len(metadata) != len(per_image):
        raise ValueError(f"save_audit_grid: {len(images)} images, {len(metadata)} metadata records and "
                         f"{len(per_image)} per-image results must match")
    if any("verdicts" not in r for r in per_image):
        raise ValueError("save_audit_grid needs per-image 'verdicts' (evaluate() with the default ShapeWorld judge)")
    order = {t: k for k, t in enumerate(TASK_ORDER)}
    idx = [i for i, r in enumerate(per_image) if len({r["verdicts"][j] for j in JUDGES}) > 1]
    n_dis = len(idx)
    idx = sorted(idx, key=lambda i: (order.get(metadata[i]["tag"], len(order)), i))[:max_images]
    font = _font(11)
    side = images.shape[1] * scale if len(images) else 32 * scale
    tw, th = max(side, 132), 4 * 13 + 4
    yn = {True: "y", False: "n"}
    if not idx:
        grid = Image.new("RGB", (420, 24), (255, 255, 255))
        ImageDraw.Draw(grid).text((4, 4), f"the four judges agree on all {len(per_image)} images", fill=(0, 0, 0),
                                  font=font)
    else:
        rows = (len(idx) + cols - 1) // cols
        grid = Image.new("RGB", (min(cols, len(idx)) * (tw + 6), rows * (side + th + 8) + 20), (255, 255, 255))
        d = ImageDraw.Draw(grid)
        d.text((4, 2), f"{n_dis} of {len(per_image)} images where the judges disagree (lenient/strict; headline: "
                       f"held-out strict)", fill=(0, 0, 0), font=font)
        for k, i in enumerate(idx):
            r, c = divmod(k, cols)
            x, y = c * (tw + 6) + 3, r * (side + th + 8) + 20
            grid.paste(Image.fromarray(images[i]).resize((side, side), Image.NEAREST), (x, y))
            v = per_image[i]["verdicts"]
            prompt = metadata[i]["prompt"].removeprefix("a photo of ")
            lines = textwrap.wrap(f"{i}: {prompt}", 22)[:2]
            lines += [f"train {yn[v['train']]}/{yn[v['train_strict']]}",
                      f"held-out {yn[v['heldout']]}/{yn[v['heldout_strict']]}"]
            d.multiline_text((x, y + side + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _cell(p: float, se: float, bold: bool = False) -> str:
    s = f"{p:.3f} ± {se:.3f}"
    return f"**{s}**" if bold else s


def format_judges_table(results_by_model: dict[str, dict], tasks=TASK_ORDER) -> str:
    """Markdown: one row per task and overall, one column per (judge, model), each cell ``score ± SE``; the
    headline judge (held-out strict) first, then held-out lenient, training strict, training lenient (the reward);
    below it the per-image agreement of the training and held-out judges per model. ``results_by_model``: name ->
    an ``evaluate`` result with ``judges`` (the default ShapeWorld judge)."""
    if not results_by_model:
        raise ValueError("format_judges_table needs at least one model's result")
    for name, res in results_by_model.items():
        if "judges" not in res:
            raise ValueError(f"format_judges_table: result {name!r} has no 'judges' (evaluate with the default "
                             "ShapeWorld judge: no scorer, no detector)")
    label = {"heldout_strict": "held-out strict (headline)", "heldout": "held-out", "train_strict": "train strict",
             "train": "train (reward)"}
    cols = [(j, m) for j in ("heldout_strict", "heldout", "train_strict", "train") for m in results_by_model]
    many = len(results_by_model) > 1
    head = [f"{label[j]}: {m}" if many else label[j] for j, m in cols]
    present = [t for t in tasks if any(t in r["judges"]["train"]["per_task"] for r in results_by_model.values())]
    lines = ["| task | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for t in present:
        cells = []
        for j, m in cols:
            jr = results_by_model[m]["judges"][j]
            cells.append(_cell(jr["per_task"][t], jr["se_per_task"][t]) if t in jr["per_task"] else "–")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(
        _cell(results_by_model[m]["judges"][j]["overall"], results_by_model[m]["judges"][j]["se_overall"], True)
        for j, m in cols) + " |")
    agree = ", ".join(f"{m} {r['agreement']['train_vs_heldout']['overall']:.3f}" for m, r in results_by_model.items())
    lines.append("")
    lines.append(f"Headline judge: {HEADLINE} (held-out strict). Per-image agreement of the training and held-out judges "
                 f"(lenient): {agree}.")
    return "\n".join(lines)


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
    save_audit_grid(images, metadata, res["per_image"], out / "audit.png")
    return res
