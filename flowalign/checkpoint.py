"""Atomic checkpoints: everything is written into a temporary directory that is renamed into place, then the
``latest`` pointer is replaced atomically, so an interrupted save never damages what was already written."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(root, name: str, weights: dict[str, torch.Tensor], state: dict, meta: dict) -> Path:
    """weights -> model.safetensors, state (optimizer, ema, rng, ...) -> state.pt, meta -> meta.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        old = root / f".old-{name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    ptr = root / f".latest-{os.getpid()}"
    ptr.write_text(name)
    os.replace(ptr, root / "latest")
    return final


def latest_checkpoint(root) -> Path | None:
    ptr = Path(root) / "latest"
    if not ptr.is_file():
        return None
    d = Path(root) / ptr.read_text().strip()
    return d if d.is_dir() else None


def is_checkpoint(directory) -> bool:
    d = Path(directory)
    return (d / "meta.json").is_file() and (d / "model.safetensors").is_file()


def load_weights(directory) -> dict[str, torch.Tensor]:
    """Only the trainable weights of a checkpoint (no optimizer state): enough to evaluate it."""
    return load_file(str(Path(directory) / "model.safetensors"))


def load_checkpoint(directory) -> tuple[dict[str, torch.Tensor], dict, dict]:
    d = Path(directory)
    for f in ("model.safetensors", "state.pt", "meta.json"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"checkpoint {d} is incomplete: missing {f}")
    return load_weights(d), torch.load(d / "state.pt", weights_only=False, map_location="cpu"), json.loads((d / "meta.json").read_text())
