"""`unimoe bench prep [--json] [--quick] [--workers N] [--seconds S]`: what prep costs over the codec.

On the same audio (generated 3 s clips at 22.05 kHz, so decoding and resampling are real work):
  codec_only:  the audio already decoded, resampled and in memory; only the batched codec encode is timed
               (same length-sorted batching as prep).
  pipeline:    the whole `unimoe data prep` (manifest, decode + checks + resample in `--workers` processes,
               codec encode, text ids, shard writing with checksums), the codec object already loaded
               and megatron-core imported (one-time costs); the worker pool start-up is timed.
Throughput is audio seconds per wall second; pipeline_over_codec = pipeline / codec_only (target >= 0.8).
Each is timed `repeats` times, alternating, and the best is kept (the machine may be shared).
The last line of output is the JSON object.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import torch

from data_prep.audio import AudioCheckConfig, load_checked
from data_prep.codec import load_codec
from data_prep.fixtures import write_corpus
from data_prep.manifest import read_manifest
from data_prep.prep import PrepConfig, _encode_block, prep
from data_prep.shards import _indexed_dataset
from data_prep.text import train_tokenizer

CLIP_SECONDS = 3.0


def run(seconds: float = 60.0, workers: int = 2, device: str = "cpu", repeats: int = 2, log=print) -> dict:
    n = max(2, math.ceil(seconds / CLIP_SECONDS))
    tmp = tempfile.mkdtemp(prefix="unimoe-bench-prep-")
    try:
        manifest = write_corpus(tmp, speech=n // 2, music=n - n // 2, seconds=CLIP_SECONDS, sr=22050)
        items, _, _ = read_manifest(manifest)
        tok = os.path.join(tmp, "spm.model")
        train_tokenizer([it.text for it in items], tok, vocab_size=64, log=lambda m: None)
        codec = load_codec("random", device=device)
        cfg_kw = dict(manifest=manifest, tokenizer=tok, codec="random", workers=workers, progress=False)
        ref = PrepConfig(out=os.path.join(tmp, "ref"), **cfg_kw)
        audio_cfg = AudioCheckConfig(codec.sample_rate, ref.min_seconds, ref.max_seconds)
        wavs = {i: load_checked(it.audio, audio_cfg) for i, it in enumerate(items)}
        audio_seconds = sum(len(w) for w in wavs.values()) / codec.sample_rate
        codec.encode(torch.zeros(1, 1, codec.sample_rate))  # warm-up
        _indexed_dataset()  # one-time megatron-core import (~5 s), like codec construction, is not timed
        codec_times, pipe_times, timings = [], [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            for b in range(0, len(items), ref.block_items):  # the pipeline's blocks, in memory
                _encode_block(
                    codec, {i: wavs[i] for i in range(b, min(len(items), b + ref.block_items))}, ref
                )
            codec_times.append(time.perf_counter() - t0)
            out = os.path.join(tmp, f"prep{r}")
            t0 = time.perf_counter()
            report = prep(PrepConfig(out=out, **cfg_kw), codec=codec, log=lambda m: None)
            pipe_times.append(time.perf_counter() - t0)
            timings.append(report["timing"])
            assert report["accepted"] == len(items), report["rejected"][:3]
            log(
                f"[bench prep] repeat {r}: codec-only {codec_times[-1]:.2f} s, "
                f"pipeline {pipe_times[-1]:.2f} s"
            )
        codec_tp = audio_seconds / min(codec_times)
        pipe_tp = audio_seconds / min(pipe_times)
        return {
            "benchmark": "prep",
            "codec": "random EnCodec 24 kHz (untrained weights; same architecture/cost as trained)",
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "workers": workers,
            "items": len(items),
            "audio_seconds": round(audio_seconds, 2),
            "input_sample_rate": 22050,
            "batch_items": ref.batch_items,
            "batch_seconds": ref.batch_seconds,
            "repeats": repeats,
            "codec_only_s": round(min(codec_times), 3),
            "pipeline_s": round(min(pipe_times), 3),
            "codec_only_audio_s_per_s": round(codec_tp, 2),
            "pipeline_audio_s_per_s": round(pipe_tp, 2),
            "pipeline_over_codec": round(pipe_tp / codec_tp, 3),
            # inside the best pipeline run: wall seconds the main process spent per stage
            "pipeline_stage_s": timings[pipe_times.index(min(pipe_times))],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(args) -> int:
    seconds = min(args.seconds, 12.0) if args.quick else args.seconds
    result = run(seconds=seconds, workers=args.workers, device=args.device, repeats=1 if args.quick else 3)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(result))
    return 0
