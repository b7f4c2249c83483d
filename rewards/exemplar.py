"""DRAGON's reward types beyond the instance-wise one: an image against an exemplar distribution, and a batch (or a
prompt group) as a distribution against an exemplar distribution or judged by its own diversity.

All embed images with an encoder (default: the shipped ``shapeclip`` image tower, unit-norm embeddings; ``path=``
any other CLIPModel directory) and compare against an exemplar set:

- ``exemplar`` (instance-to-distribution): cosine similarity of an image's embedding to the exemplar mean
  (``knn=k``: the mean cosine to its k nearest exemplars). Exemplars: ``source: shapeworld`` renders
  ``n_exemplars`` clean scenes of *each prompt's own* metadata (a per-prompt set, cached), or ``images: DIR`` one
  shared set from a folder of PNG/JPEG files.
- ``frechet`` (distribution-to-distribution): the Frechet distance between the Gaussian fits of the batch's
  embeddings and of the exemplars' (``source: shapeworld``: renders of random scenes of every task, one shared set;
  or ``images: DIR``). Group scope: in training it is computed on the whole iteration gathered from every process,
  and each image's reward is its marginal contribution, FD(batch without i) - FD(batch) (> 0: the image moves the
  batch toward the exemplars). ``fd`` reports the batch's distance itself.
- ``vendi`` (a distribution's own diversity): the Vendi score of each prompt group, exp(-sum l log l) over the
  eigenvalues l of K / n, K the cosine-similarity kernel of the group's embeddings (1 .. n: the effective number
  of distinct images); each image's reward is its marginal contribution Vendi(G) - Vendi(G without i).

Embeddings are returned as the ``emb`` output (B, D) so that ``finalize`` can work on gathered batches.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import Reward, RewardError, register


def _encoder(path):
    from .shapeclip import ShapeClipReward

    return ShapeClipReward(path=path)


def _load_folder(d) -> torch.Tensor:
    from PIL import Image

    p = Path(d).expanduser()
    if not p.is_dir():
        raise RewardError(f"exemplar images: folder not found: {d}")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise RewardError(f"exemplar images: no .png/.jpg files in {d}")
    arr = []
    for f in files:
        try:
            arr.append(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0)
        except OSError as e:
            raise RewardError(f"exemplar images: cannot read {f}: {e}") from None
    sizes = {a.shape for a in arr}
    if len(sizes) != 1:
        raise RewardError(f"exemplar images: all images in {d} must have one size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)


def _renders(metas: list[dict], seed: int) -> torch.Tensor:
    from flowalign.shapeworld.world import render, scene_for

    rng = random.Random(seed)
    arr = [np.asarray(render(scene_for(m, rng)), np.float32) / 255.0 for m in metas]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2), in float64 (eigendecompositions, no sqrtm)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, cov1, cov2))
    w, v = torch.linalg.eigh(cov2)
    s2 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = s2 @ cov1 @ s2
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def _fit(e: torch.Tensor):
    e = e.double()
    mu = e.mean(0)
    c = e - mu
    return mu, c.T @ c / max(len(e) - 1, 1)


def vendi_score(emb: torch.Tensor) -> float:
    """exp(entropy of the eigenvalues of K/n), K = cosine-similarity kernel: 1 for identical images, n for
    mutually orthogonal ones."""
    e = F.normalize(emb.double(), dim=-1)
    lam = torch.linalg.eigvalsh(e @ e.T / len(e)).clamp_min(0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def leave_one_out(values: torch.Tensor, fn, sign: float) -> torch.Tensor:
    """sign x (fn(all) - fn(all without i)) per row: each row's marginal contribution."""
    full = fn(values)
    idx = torch.arange(len(values))
    return torch.tensor([sign * (full - fn(values[idx != i])) for i in range(len(values))])


class _Embedded(Reward):
    differentiable = False

    def __init__(self, path=None, device="cpu", batch_size: int = 256):
        super().__init__(device=device, batch_size=batch_size)
        self.enc = _encoder(path)
        self.size = self.enc.size

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.enc.image_embeds(images[i:i + 256]) for i in range(0, len(images), 256)]).float()


class ExemplarReward(_Embedded):
    name = "exemplar"

    def __init__(self, source: str = "shapeworld", images=None, n_exemplars: int = 16, knn: int | None = None,
                 path=None, seed: int = 0, device="cpu", batch_size: int = 256):
        super().__init__(path, device, batch_size)
        if images is None and source != "shapeworld":
            raise RewardError(f"exemplar: source must be 'shapeworld' (per-prompt renders) or give images: DIR, "
                              f"got {source!r}")
        if knn is not None and (not isinstance(knn, int) or knn < 1):
            raise RewardError(f"exemplar: knn must be a positive integer, got {knn!r}")
        self.n, self.knn, self.seed = int(n_exemplars), knn, seed
        self.shared = self.embed(_load_folder(images)) if images is not None else None
        self.needs_metadata = self.shared is None
        self._cache: dict[str, torch.Tensor] = {}

    def exemplars(self, meta: dict | None) -> torch.Tensor:
        if self.shared is not None:
            return self.shared
        key = meta["prompt"]
        if key not in self._cache:
            s = int(hashlib.sha256(f"{self.seed}/{key}".encode()).hexdigest()[:8], 16)
            self._cache[key] = self.embed(_renders([meta] * self.n, s))
        return self._cache[key]

    def score(self, images, prompts, metadata):
        e = self.embed(images)
        out = []
        for i in range(len(e)):
            ex = self.exemplars(metadata[i] if metadata is not None else None)
            if self.knn is None:
                out.append(e[i] @ F.normalize(ex.mean(0), dim=0))
            else:
                out.append((ex @ e[i]).topk(min(self.knn, len(ex))).values.mean())
        return {"reward": torch.stack(out), "emb": e}


class FrechetReward(_Embedded):
    name = "frechet"
    group_scope = True

    def __init__(self, source: str = "shapeworld", images=None, n_exemplars: int = 512, path=None, seed: int = 0,
                 device="cpu", batch_size: int = 256):
        super().__init__(path, device, batch_size)
        if images is not None:
            ex = self.embed(_load_folder(images))
        elif source == "shapeworld":
            from flowalign.shapeworld.world import TASKS, random_metadata

            rng = random.Random(seed)
            ex = self.embed(_renders([random_metadata(TASKS[i % len(TASKS)], rng) for i in range(n_exemplars)], seed))
        else:
            raise RewardError(f"frechet: source must be 'shapeworld' or give images: DIR, got {source!r}")
        self.mu, self.cov = _fit(ex)

    def fd(self, e: torch.Tensor) -> float:
        mu, cov = _fit(e)
        return frechet_distance(mu, cov, self.mu, self.cov)

    def _finish(self, e: torch.Tensor) -> dict:
        r = leave_one_out(e, self.fd, -1.0)   # FD(without i) - FD(all)
        return {"reward": r.float(), "fd": torch.full((len(e),), self.fd(e))}

    def score(self, images, prompts, metadata):
        e = self.embed(images)
        return dict(self._finish(e), emb=e)

    def finalize(self, outputs, groups):
        return dict(outputs, **self._finish(outputs["emb"].cpu()))


class VendiReward(_Embedded):
    name = "vendi"
    group_scope = True

    def _finish(self, e: torch.Tensor, groups) -> dict:
        r, v = torch.zeros(len(e)), torch.zeros(len(e))
        index: dict = {}
        for i, g in enumerate(groups):
            index.setdefault(g, []).append(i)
        for members in index.values():
            m = torch.tensor(members)
            v[m] = vendi_score(e[m])
            if len(members) > 1:
                r[m] = leave_one_out(e[m], vendi_score, 1.0).float()
        return {"reward": r, "vendi": v}

    def score(self, images, prompts, metadata):
        e = self.embed(images)
        return dict(self._finish(e, list(prompts)), emb=e)

    def finalize(self, outputs, groups):
        return dict(outputs, **self._finish(outputs["emb"].cpu(), groups.tolist()))


@register("exemplar")
def _build_exemplar(source: str = "shapeworld", images=None, n_exemplars: int = 16, knn: int | None = None,
                    path=None, seed: int = 0, device: str = "cpu", batch_size: int = 256) -> ExemplarReward:
    return ExemplarReward(source, images, n_exemplars, knn, path, seed, device, batch_size)


@register("frechet")
def _build_frechet(source: str = "shapeworld", images=None, n_exemplars: int = 512, path=None, seed: int = 0,
                   device: str = "cpu", batch_size: int = 256) -> FrechetReward:
    return FrechetReward(source, images, n_exemplars, path, seed, device, batch_size)


@register("vendi")
def _build_vendi(path=None, device: str = "cpu", batch_size: int = 256) -> VendiReward:
    return VendiReward(path, device, batch_size)
