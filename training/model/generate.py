"""Sampling audio codes from an AudioLM: KV cache, classifier-free guidance, top-k/top-p/temperature.

    codes = generate(model, ["music"], [text_ids], max_frames=750, generator=torch.Generator().manual_seed(0))
    codes.shape == (N, K, T)       # delay undone; decode with the codec

Prompts are left-padded (the attention mask hides the padding, positions start at 0 for every row).
Per step one frame of K codes is sampled; the delay pattern decides what is forced:
    codebook k before its delay ends   -> BOS
    after the lead codebook's EOS      -> content until codebook k's own EOS, then PAD
The lead codebook (smallest delay, codebook 0 in the usual patterns) decides the length: EOS is masked
until `min_frames` frames exist and forced at `max_frames`.
CFG (reference code, Dia-style): guided = cond + scale * (cond - uncond); with `cfg_filter_top_k` the
sample is drawn from the conditional logits restricted to the guided top-k (the reference's
cfg_filter_top_k=45), else from the guided logits. The unconditional prompt keeps the task token and
drops the text (as training's conditioning dropout does). scale 0 skips the unconditional pass.
"""

from __future__ import annotations

import torch

from training.model.batch import TEXT_PAD_ID, prompt_ids
from training.model.lm import TASKS, AudioLM, KVCache

DEFAULT_CFG_SCALE = {"speech": 1.0, "music": 10.0}  # paper: guidance 1 for speech, 10 for music


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] (-inf = forbidden) -> sampled ids [...]; temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, idx = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def _left_pad(prompts: list[list[int]]):
    P = max(len(p) for p in prompts)
    text = torch.full((len(prompts), P), TEXT_PAD_ID, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        text[i, P - len(p):] = torch.tensor(p)
        valid[i, P - len(p):] = True
    return text, valid


@torch.no_grad()
def generate(model: AudioLM, tasks: list[str] | str, text_ids: list, *, max_frames: int = 1000,
             min_frames: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_scale: float | dict | None = None, cfg_filter_top_k: int | None = 45,
             generator: torch.Generator | None = None, return_lengths: bool = False, progress: bool = False):
    """Sample N code sequences. tasks: one task or one per sample; text_ids: one id list per sample.

    Returns codes [N, K, T_max] (long; frames past a sample's own length are 0), and the lengths [N]
    when return_lengths. cfg_scale: a number for all samples, a {task: scale} dict, or None for
    DEFAULT_CFG_SCALE.
    """
    cfg = model.cfg
    pattern = cfg.delays()
    N = len(text_ids)
    tasks = [tasks] * N if isinstance(tasks, str) else list(tasks)
    if len(tasks) != N:
        raise ValueError(f"generate: {len(tasks)} tasks for {N} text prompts")
    if not 0 <= min_frames <= max_frames or max_frames < 1:
        raise ValueError(f"generate: need 0 <= min_frames <= max_frames and max_frames >= 1, "
                         f"got min_frames={min_frames}, max_frames={max_frames}")
    total = (pattern.delayed_length(max_frames) - 1) + max(len(t) for t in text_ids) + 2
    if total > cfg.max_seq_len:
        raise ValueError(f"generate: prompt + {max_frames} frames need {total} positions > model max_seq_len "
                         f"{cfg.max_seq_len}; lower max_frames")
    scales = {**DEFAULT_CFG_SCALE, **(cfg_scale if isinstance(cfg_scale, dict) else {})}
    scale = torch.tensor([float(cfg_scale) if isinstance(cfg_scale, (int, float)) else scales[t]
                          for t in tasks])
    use_cfg = bool((scale != 0).any())
    prompts = [prompt_ids(t, ids) for t, ids in zip(tasks, text_ids)]
    task_idx = torch.tensor([TASKS.index(t) for t in tasks])
    if use_cfg:
        prompts += [prompt_ids(t, [], drop_text=True) for t in tasks]
        task_idx = torch.cat([task_idx, task_idx])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K, V, C = cfg.num_codebooks, cfg.padded_audio_vocab_size, cfg.codebook_size
    delays = torch.tensor(pattern.delays, device=device)
    lead = int(delays.argmin())
    d_lead = int(delays[lead])

    # prefill: prompt + frame 0 (all BOS)
    text, valid = _left_pad(prompts)
    B = text.shape[0]
    text = torch.cat([text, torch.full((B, 1), TEXT_PAD_ID)], dim=1).to(device)
    valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1).to(device)
    audio = torch.full((B, K, text.shape[1]), pattern.pad, device=device)
    audio[:, :, -1] = pattern.bos
    audio_mask = torch.zeros_like(valid)
    audio_mask[:, -1] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    task_ids = torch.where(valid, task_idx.to(device)[:, None], -1)  # -1 on padding (MoE stats)
    cache = KVCache(cfg.num_layers)
    logits, _ = model.forward_logits(text, audio, audio_mask, positions=positions, valid=valid, cache=cache,
                                     task_ids=task_ids)
    frames = [torch.full((N, K), pattern.bos, device=device)]
    eos_frame = torch.full((N,), -1, device=device)  # frame index of the lead codebook's EOS
    last_pos = positions[:, -1]
    t = 0
    scale = scale.to(device)[:, None, None]
    steps = range(1, pattern.delayed_length(max_frames))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="generate", unit="frame")
    for t in steps:
        # codes only; EOS for the lead codebook once min_frames exist
        allowed = torch.zeros(N, K, V, dtype=torch.bool, device=device)
        allowed[:, :, :C] = True
        n_frames = t - d_lead - 1  # content frames of the lead codebook before this one
        if n_frames >= min_frames:
            allowed[:, lead, pattern.eos] = True
        lg = logits[:, -1].float()  # [B, K, V]
        if use_cfg:
            cond, uncond = lg[:N], lg[N:]
            guided = (cond + scale * (cond - uncond)).masked_fill(~allowed, float("-inf"))
            if cfg_filter_top_k:
                kth = guided.topk(min(cfg_filter_top_k, V), dim=-1).values[..., -1:]
                lg = cond.masked_fill(guided < kth, float("-inf"))
            else:
                lg = guided
        lg = lg.masked_fill(~allowed, float("-inf"))
        frame = sample_logits(lg, temperature, top_k, top_p, generator)  # [N, K]
        # forced tokens from the delay layout
        started = eos_frame >= 0
        if n_frames >= max_frames:
            frame[~started, lead] = pattern.eos
        new_eos = ~started & (frame[:, lead] == pattern.eos)
        eos_frame = torch.where(new_eos, torch.full_like(eos_frame, t), eos_frame)
        own_eos = eos_frame[:, None] - d_lead + delays[None, :]  # [N, K] frame of codebook k's EOS
        ended = eos_frame[:, None] >= 0
        frame = torch.where(ended & (t == own_eos), torch.full_like(frame, pattern.eos), frame)
        frame = torch.where(ended & (t > own_eos), torch.full_like(frame, pattern.pad), frame)
        frame = torch.where(t <= delays[None, :], torch.full_like(frame, pattern.bos), frame)
        frames.append(frame)
        if bool((ended[:, 0] & (t >= own_eos.max(dim=1).values)).all()):
            break
        inp = torch.cat([frame, frame]) if use_cfg else frame
        last_pos = last_pos + 1
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        logits, _ = model.forward_logits(torch.full((B, 1), TEXT_PAD_ID, device=device), inp[:, :, None],
                                         torch.ones(B, 1, dtype=torch.bool, device=device),
                                         positions=last_pos[:, None], valid=valid, cache=cache,
                                         task_ids=task_idx.to(device)[:, None])
    model.train(was_training)
    delayed = torch.stack(frames, dim=-1)  # [N, K, S]
    lengths = (eos_frame - d_lead - 1).clamp(min=0)
    T = int(lengths.max())
    codes = torch.zeros(N, K, T, dtype=torch.long, device=device)
    for i in range(N):
        n = int(lengths[i])
        codes[i, :, :n] = pattern.undo(delayed[i], num_frames=n)
    return (codes, lengths) if return_lengths else codes

