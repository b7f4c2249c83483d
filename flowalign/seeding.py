"""Named random streams: every random draw of a run comes from a generator seeded by (run seed, stream name, keys),
hashed, so streams never collide (hand-mixed formulas such as seed * 7919 + it * 131 + rank did at 8+ processes)
and a sample's draws depend on what it is (iteration, group, member), not on which process or batch holds it."""
from __future__ import annotations

import hashlib
import random

import torch


def stream_seed(seed: int, name: str, *keys) -> int:
    h = hashlib.sha256(repr((int(seed), name, *map(int, keys))).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def generator(seed: int, name: str, *keys) -> torch.Generator:
    """A CPU torch generator (draw on the CPU, then move: a CPU generator cannot draw on a CUDA device)."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *keys))


def rng(seed: int, name: str, *keys) -> random.Random:
    return random.Random(stream_seed(seed, name, *keys))
