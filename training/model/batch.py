"""Collate samples into model batches: <task> text <sep> delayed audio frames, right-padded.

A sample is {"id": str, "task": "speech"|"music", "text_ids": int array [L], "codes": int array [K, T]}.
Batch tensors (B samples, L = longest prefix + frames):
    text       [B, L]     text ids at prefix positions, TEXT_PAD_ID elsewhere
    audio      [B, K, L]  input frames 0..S-2 of the delayed layout at audio positions, PAD elsewhere
    audio_mask [B, L]     True at audio positions
    labels     [B, K, L]  the next frame's codes at audio positions; IGNORE_INDEX for BOS/PAD targets,
                          text positions and padding (EOS targets are kept)
    task_ids   [B, L]     task index (training.model.TASKS) at real positions, -1 on padding (MoE stats)
    task       [B]        task index per sample
    valid      [B, L]     True at real (non-padding) positions
    cond_dropped [B]      True where the text was dropped (classifier-free guidance training)
"""

from __future__ import annotations

import numpy as np
import torch

from data_prep.text import SEP_ID, TASK_TOKEN_IDS, TEXT_PAD_ID
from training.model.lm import IGNORE_INDEX, TASKS, ModelConfig


def prompt_ids(task: str, text_ids, drop_text: bool = False) -> list[int]:
    """<task> text <sep>; the unconditional prompt (CFG) keeps the task token and drops the text."""
    if task not in TASK_TOKEN_IDS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASK_TOKEN_IDS)}")
    text = [] if drop_text else [int(t) for t in np.asarray(text_ids).reshape(-1)]
    return [TASK_TOKEN_IDS[task], *text, SEP_ID]


def collate(samples: list[dict], model_cfg: ModelConfig, cond_drop_prob: float = 0.0,
            generator: torch.Generator | None = None) -> dict:
    if not samples:
        raise ValueError("collate: empty list of samples")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"collate: cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    pattern = model_cfg.delays()
    K = model_cfg.num_codebooks
    drop = torch.rand(len(samples), generator=generator) < cond_drop_prob
    prompts, delayed, tasks = [], [], []
    for i, s in enumerate(samples):
        codes = torch.as_tensor(np.asarray(s["codes"]), dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] != K:
            raise ValueError(f"sample {s.get('id', i)!r}: codes must be [K={K}, T], got {tuple(codes.shape)}")
        if s["task"] not in TASKS:
            raise ValueError(f"sample {s.get('id', i)!r}: task {s['task']!r} not in {TASKS}")
        prompt = prompt_ids(s["task"], s["text_ids"], bool(drop[i]))
        if max(prompt) >= model_cfg.text_vocab_size:
            raise ValueError(f"sample {s.get('id', i)!r}: text id {max(prompt)} >= text_vocab_size "
                             f"{model_cfg.text_vocab_size} (model config and tokenizer disagree)")
        prompts.append(prompt)
        delayed.append(pattern.apply(codes))
        tasks.append(TASKS.index(s["task"]))
    # the prefix is followed by frames 0..S-2 as inputs; frames 1..S-1 are their targets
    lengths = [len(p) + d.shape[1] - 1 for p, d in zip(prompts, delayed)]
    B, L = len(samples), max(lengths)
    if L > model_cfg.max_seq_len:
        raise ValueError(f"collate: sequence of {L} positions exceeds max_seq_len {model_cfg.max_seq_len}; "
                         f"crop the audio or raise model.max_seq_len")
    text = torch.full((B, L), TEXT_PAD_ID, dtype=torch.long)
    audio = torch.full((B, K, L), pattern.pad, dtype=torch.long)
    labels = torch.full((B, K, L), IGNORE_INDEX, dtype=torch.long)
    audio_mask = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, (p, d) in enumerate(zip(prompts, delayed)):
        P, S = len(p), d.shape[1]
        text[i, :P] = torch.tensor(p)
        audio[i, :, P: P + S - 1] = d[:, :-1]
        target = d[:, 1:].clone()
        target[pattern.frame_is_special(S - pattern.max_delay - 2)[:, 1:]] = IGNORE_INDEX
        labels[i, :, P: P + S - 1] = target
        audio_mask[i, P: P + S - 1] = True
        valid[i, : P + S - 1] = True
    task = torch.tensor(tasks, dtype=torch.long)
    task_ids = torch.where(valid, task[:, None], torch.full_like(text, -1))
    return {"text": text, "audio": audio, "audio_mask": audio_mask, "labels": labels,
            "task_ids": task_ids, "task": task, "valid": valid, "cond_dropped": drop}
