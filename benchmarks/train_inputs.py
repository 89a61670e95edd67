"""The model config and batch the training-step benchmarks share (bench_train, bench_train_parallel)."""

from __future__ import annotations

import numpy as np

from training.model import ModelConfig
from training.model.batch import collate


def tiny_cfg(moe: dict | None, ffn: int, num_layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=hidden, num_heads=4, ffn_hidden_size=ffn,
                       num_codebooks=8, codebook_size=1024, delay_pattern="musicgen", text_vocab_size=512,
                       max_seq_len=4096, moe=moe)


def make_batch(cfg: ModelConfig, batch: int, frames: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    samples = [{"id": str(i), "task": ("speech", "music")[i % 2], "text_ids": rng.integers(5, 500, size=16),
                "codes": rng.integers(0, cfg.codebook_size, size=(cfg.num_codebooks, frames))}
               for i in range(batch)]
    return collate(samples, cfg)
