"""Fitting the demo codec (data_prep/demo_codec.py), deterministically.

    codec = fit_demo_codec(wavs_24khz, DemoCodecConfig(), FitConfig())   # the same bits in every process

Bit-identical whatever the thread count and in any process, because nothing thread-dependent reaches a
value: the whole fit runs in float64 on one torch thread (its reductions then have one fixed order), the
frames used and the initial centroids come from numpy's seeded PCG64 (integer algorithms), centroid sums
are `index_add_` in frame order, ties go to the lowest index, and every fitted tensor is rounded to a
power-of-two grid fine enough to be exact in float32 (2^-24 of its largest value), so last-bit differences
of float64 math on another CPU change a stored value only with vanishing probability.
Measured: naive float32 k-means with torch's default threads gave 33 % equal codes between 1 and 2 threads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data_prep.demo_codec import DemoCodec, DemoCodecConfig, features

CHUNK = 4096  # frames per distance block (bounds memory: CHUNK x entries float64)


@dataclass(frozen=True)
class FitConfig:
    max_frames: int = 20000  # frames sampled (seeded) from the corpus for PCA and k-means
    iterations: int = 10  # Lloyd iterations per codebook level
    seed: int = 0


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 2^(e - 24), 2^(e-1) <= max |x| < 2^e: exact in float32 and float64."""
    top = x.abs().max().item()
    if top == 0.0:
        return x.clone()
    step = 2.0 ** (math.frexp(top)[1] - 24)
    return torch.round(x / step) * step


def _assign(x: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest entry, its squared distance) per row of x; ties to the lowest index."""
    book_sq, idx, dist = book.pow(2).sum(1), [], []
    for i in range(0, len(x), CHUNK):
        xc = x[i : i + CHUNK]
        d = book_sq[None] - 2 * xc @ book.t()
        best = d.argmin(1)
        idx.append(best)
        dist.append(d.gather(1, best[:, None])[:, 0] + xc.pow(2).sum(1))
    return torch.cat(idx), torch.cat(dist)


def pca(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], basis [D, dims]): the top principal directions, largest first, each with its largest
    component positive; both on the grid."""
    mean = _on_grid(x.mean(0))
    centred = x - mean
    values, vectors = torch.linalg.eigh(centred.t() @ centred / len(x))
    basis = vectors[:, torch.argsort(-values, stable=True)[:dims]]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))[0]
    return mean, _on_grid(basis * signs)


def kmeans(x: torch.Tensor, entries: int, iterations: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means from `entries` seeded distinct frames; an empty cluster takes the frame worst served
    (largest distance, lowest index first). -> book [entries, D] on the grid."""
    rng = np.random.default_rng(seed)
    start = rng.permutation(len(x))[: entries] if len(x) >= entries else rng.integers(0, len(x), entries)
    book = _on_grid(x[torch.from_numpy(np.asarray(start, dtype=np.int64))])
    for _ in range(iterations):
        assign, dist = _assign(x, book)
        sums = torch.zeros_like(book).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=entries)
        book = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), book)
        empty = torch.nonzero(counts == 0)[:, 0]
        if len(empty):
            worst = torch.argsort(-dist, stable=True)[: len(empty)]
            book[empty[: len(worst)]] = x[worst]
        book = _on_grid(book)
    return book


def fit_demo_codec(wavs: list[np.ndarray], cfg: DemoCodecConfig = DemoCodecConfig(),
                   fit: FitConfig = FitConfig(), log=lambda m: None) -> DemoCodec:
    """wavs: mono float arrays at cfg.sample_rate. The fit record (frames, settings) goes into info()."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        feats = torch.cat([features(cfg, torch.from_numpy(np.asarray(w, np.float64))[None])[0] for w in wavs])
        pick = np.sort(np.random.default_rng([fit.seed, 1]).permutation(len(feats))[: fit.max_frames])
        x = feats[torch.from_numpy(pick)]
        if len(x) < 2:
            raise ValueError(f"the demo codec needs at least 2 frames to fit, got {len(x)}")
        mean, basis = pca(x, cfg.dims)
        residual = (x - mean) @ basis
        books = []
        for level in range(cfg.levels):
            books.append(kmeans(residual, cfg.entries, fit.iterations, seed=fit.seed * 1000 + level))
            residual = residual - books[-1][_assign(residual, books[-1])[0]]
            rms = residual.pow(2).mean().sqrt().item()
            log(f"[demo-codec] level {level + 1}/{cfg.levels}: residual rms {rms:.4f}")
    finally:
        torch.set_num_threads(threads)
    record = {**asdict(fit), "clips": len(wavs), "frames": len(feats), "frames_used": len(x),
              "audio_s": round(sum(len(w) for w in wavs) / cfg.sample_rate, 2)}
    return DemoCodec(cfg, mean.float(), basis.float(), torch.stack(books).float(), fit=record)
