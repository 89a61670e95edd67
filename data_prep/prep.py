"""`unimoe data prep`: manifest -> audio checks -> codec tokens (batched) + text ids -> indexed shards.

Pipeline: the manifest's valid items are cut into shards of `shard_size` items in manifest order (shard k
always holds the same items, so re-runs and job-array slices agree). Audio is decoded, checked, downmixed
and resampled by a pool of `workers` processes (data_prep.audio; 0 = in this process), a block of items
ahead of the codec, which encodes length-sorted batches padded to equal length and cuts each item's codes
to its own frame count. Each finished shard is written atomically and listed (data_prep.shards).
Every rejected line/file goes to prep_report.json with its reason.
"""

from __future__ import annotations

import glob
import hashlib
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from data_prep import shards as sh
from data_prep.audio import AudioCheckConfig, load_job
from data_prep.codec import CODECS, Codec, CodecUnavailable, load_codec
from data_prep.manifest import ManifestItem, read_manifest, reject
from data_prep.text import Tokenizer

CRASH_ENV = "UNIMOE_PREP_CRASH_AFTER_ITEMS"  # fault injection for tests: raise after N items written this run


class PrepError(Exception):
    """Bad configuration or nothing usable: the message is the one-line reason."""


@dataclass
class PrepConfig:
    manifest: str
    out: str
    tokenizer: str | None = None  # default: <out>/../spm.model
    codec: str = "encodec_24khz"
    bandwidth: float = 6.0
    codec_checkpoint: str | None = None
    codec_seed: int = 0
    device: str = "cpu"  # where the codec runs
    workers: int = 1
    min_seconds: float = 0.2
    max_seconds: float = 30.0
    shard_size: int = 256
    slice_index: int = 0
    num_slices: int = 1
    block_items: int = 8  # items handed to the decode pool at once (the pipeline granularity)
    batch_items: int = 8  # items per codec batch
    batch_seconds: float = 8.0  # padded audio seconds per codec batch (small batches are faster on CPU)
    progress: bool = True

    def __post_init__(self):
        if self.codec not in CODECS:
            raise PrepError(f"unknown codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.codec_checkpoint and not os.path.isfile(self.codec_checkpoint):
            raise PrepError(f"--codec-checkpoint {self.codec_checkpoint} does not exist")
        if self.workers < 0:
            raise PrepError(f"--workers must be >= 0, got {self.workers}")
        if self.shard_size < 1 or self.block_items < 1 or self.batch_items < 1:
            raise PrepError("--shard-size, block_items and batch_items must be >= 1")
        if not 0 <= self.slice_index < self.num_slices:
            raise PrepError(f"--slice must be i/n with 0 <= i < n, got {self.slice_index}/{self.num_slices}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise PrepError(
                f"need 0 <= --min-seconds < --max-seconds, got {self.min_seconds}, {self.max_seconds}"
            )
        if not os.path.isfile(self.manifest):
            raise PrepError(f"manifest not found: {self.manifest}")
        if self.tokenizer is None:
            self.tokenizer = os.path.join(os.path.dirname(os.path.abspath(self.out)), "spm.model")
        if not os.path.isfile(self.tokenizer):
            raise PrepError(
                f"tokenizer not found: {self.tokenizer} (pass --tokenizer or run `unimoe data tokenizer`)"
            )


def parse_slice(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PrepError(f"--slice must look like i/n (e.g. 3/8), got {text!r}") from None
    return i, n


def _shard_key(items: list[ManifestItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.task}\t{it.audio}\t{it.text}\t{it.split}\n".encode())
    return h.hexdigest()[:16]


def _encode_block(codec: Codec, wavs: dict[int, np.ndarray], cfg: PrepConfig) -> dict[int, np.ndarray]:
    """Encode {index: samples} in length-sorted padded batches -> {index: codes [K, T_i] uint16}."""
    order = sorted(wavs, key=lambda i: len(wavs[i]))
    max_samples = int(cfg.batch_seconds * codec.sample_rate)
    out, batch = {}, []

    def flush():
        length = len(wavs[batch[-1]])  # longest of the batch (sorted)
        x = torch.zeros(len(batch), 1, length)
        for b, i in enumerate(batch):
            x[b, 0, : len(wavs[i])] = torch.from_numpy(wavs[i])
        codes = codec.encode(x).cpu().numpy().astype(np.uint16)
        for b, i in enumerate(batch):
            out[i] = np.ascontiguousarray(codes[b, :, : codec.num_frames(len(wavs[i]))])
        batch.clear()

    for i in order:
        if batch and (len(batch) >= cfg.batch_items or len(wavs[i]) * (len(batch) + 1) > max_samples):
            flush()
        batch.append(i)
    if batch:
        flush()
    return out


def _config_record(cfg: PrepConfig, codec: Codec, tok: Tokenizer) -> dict:
    return {
        "codec": codec.fingerprint(),
        "bandwidth": codec.bandwidth,
        "tokenizer_sha256": sh.sha256_file(tok.path),
        "min_seconds": cfg.min_seconds,
        "max_seconds": cfg.max_seconds,
        "shard_size": cfg.shard_size,
        "manifest": os.path.abspath(cfg.manifest),
    }


def prep(cfg: PrepConfig, codec: Codec | None = None, log=print) -> dict:
    """Run the pipeline for one slice; returns the report dict (also written beside the shards)."""
    t0 = time.time()
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PrepError(f"output directory {cfg.out} is not writable: {e.strerror}") from None
    try:
        items, manifest_rejects, seen = read_manifest(cfg.manifest)
    except OSError as e:
        raise PrepError(f"cannot read manifest {cfg.manifest}: {e.strerror}") from None
    try:
        tok = Tokenizer(cfg.tokenizer)
    except (ValueError, RuntimeError, OSError) as e:
        raise PrepError(f"unusable tokenizer {cfg.tokenizer}: {' '.join(str(e).split())}") from None
    if codec is None:
        try:
            codec = load_codec(
                cfg.codec, cfg.bandwidth, cfg.codec_checkpoint, cfg.device, seed=cfg.codec_seed
            )
        except (CodecUnavailable, ValueError) as e:
            raise PrepError(str(e)) from None
        except (RuntimeError, AssertionError) as e:  # e.g. --device cuda on a machine without CUDA
            raise PrepError(
                f"cannot run the codec on --device {cfg.device}: {' '.join(str(e).split())}"
            ) from None
    if not codec.trained:
        log(f"[prep] WARNING: {codec.info()['label']}")
    if codec.codebook_size > np.iinfo(np.uint16).max:
        raise PrepError(f"codebook size {codec.codebook_size} does not fit the uint16 shards")

    shard_items = [items[k : k + cfg.shard_size] for k in range(0, len(items), cfg.shard_size)]
    mine = [k for k in range(len(shard_items)) if k % cfg.num_slices == cfg.slice_index]
    list_path = os.path.join(cfg.out, sh.list_name(cfg.slice_index, cfg.num_slices))
    config = _config_record(cfg, codec, tok)
    listing = {
        "version": 1,
        "codec": codec.info(),
        "tokenizer": {"path": tok.path, "vocab_size": tok.vocab_size},
        "config": config,
        "slice": [cfg.slice_index, cfg.num_slices],
        "shards": [],
    }
    if os.path.isfile(list_path):
        old = sh.load_list(list_path)
        if old.get("config") != config:
            raise PrepError(
                f"{cfg.out} holds shards made with another configuration (codec, tokenizer, bounds, "
                "shard size or manifest): use a new --out or remove the old one"
            )
        listing["shards"] = old["shards"]

    done = {e["index"]: e for e in listing["shards"]}
    todo = []
    for k in mine:
        e = done.get(k)
        problem = (
            "not listed"
            if e is None
            else (
                "input changed"
                if e.get("input") != _shard_key(shard_items[k])
                else sh.verify_entry(cfg.out, e)
            )
        )
        if problem is None:
            continue
        if e is not None:
            log(f"[prep] rebuilding {e['name']}: {problem}")
            listing["shards"] = [x for x in listing["shards"] if x["index"] != k]
        todo.append(k)
    if len(mine) > len(todo):
        log(f"[prep] skipping {len(mine) - len(todo)} complete shard(s) (checksums verified)")

    sh.write_json_atomic(list_path, listing)  # listed even when this slice has no shards (for the merge)
    for k in todo:  # temporary files of a crashed earlier run of these shards
        for stale in glob.glob(os.path.join(cfg.out, f".tmp.{sh.shard_name(k)}.*")):
            os.remove(stale)
    audio_cfg = AudioCheckConfig(codec.sample_rate, cfg.min_seconds, cfg.max_seconds)
    crash_after = int(os.environ.get(CRASH_ENV, "0")) or None
    blocks = [
        (k, b, shard_items[k][b : b + cfg.block_items])
        for k in todo
        for b in range(0, len(shard_items[k]), cfg.block_items)
    ]
    total = sum(len(shard_items[k]) for k in todo)
    # fork (as torch's DataLoader does on Linux): cheap start, and works from any __main__; the workers only
    # run numpy/soundfile code (data_prep.audio). spawn where fork does not exist.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    workers = cfg.workers
    if workers > 0 and mp.current_process().daemon:  # e.g. inside a DataLoader/Pool worker: no children
        log("[prep] running in a daemonic process: decoding in this process (--workers ignored)")
        workers = 0
    pool = ctx.Pool(workers) if workers > 0 and blocks else None
    pending, written = [], 0
    timing = {"decode_wait_s": 0.0, "codec_s": 0.0, "write_s": 0.0}  # wall time of the main process by stage

    def submit(b):
        jobs = [(j, it.audio, audio_cfg) for j, it in enumerate(blocks[b][2])]
        pending.append(
            pool.map_async(load_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))) if pool else jobs
        )

    try:
        bar = tqdm(total=total, desc="prep", unit="item", disable=not cfg.progress, file=sys.stderr)
        for b in range(min(2, len(blocks))):
            submit(b)
        results: dict[int, tuple] = {}  # shard-local index -> (samples_seconds, codes) or reason
        for b, (k, base, block) in enumerate(blocks):
            job = pending.pop(0)
            if b + 2 < len(blocks):
                submit(b + 2)  # keep the pool two blocks ahead of the codec
            t = time.perf_counter()
            loaded = job.get() if pool else [load_job(j) for j in job]
            wavs = {j: w for j, w, _ in loaded if w is not None}
            timing["decode_wait_s"] += time.perf_counter() - t
            t = time.perf_counter()
            codes = _encode_block(codec, wavs, cfg) if wavs else {}
            timing["codec_s"] += time.perf_counter() - t
            for j, w, reason in loaded:
                results[base + j] = reason if w is None else (len(w) / codec.sample_rate, codes[j])
            bar.update(len(block))
            if base + len(block) == len(shard_items[k]):  # last block of shard k: write it
                t = time.perf_counter()
                entry = _write_shard(cfg, k, shard_items[k], results, tok, crash_after, written)
                written += entry["items"]
                listing["shards"].append(entry)
                listing["shards"].sort(key=lambda e: e["index"])
                sh.write_json_atomic(list_path, listing)
                results = {}
                timing["write_s"] += time.perf_counter() - t
        bar.close()
    finally:
        if pool:
            pool.terminate()
            pool.join()

    report = _report(cfg, listing, manifest_rejects, seen, codec, time.time() - t0, mine, shard_items)
    report["timing"] = {k: round(v, 3) for k, v in timing.items()}
    sh.write_json_atomic(os.path.join(cfg.out, sh.report_name(cfg.slice_index, cfg.num_slices)), report)
    return report


def _write_shard(cfg, k, items, results, tok, crash_after, written) -> dict:
    writer = sh.ShardWriter(cfg.out, k)
    rejected = []
    for j, it in enumerate(items):
        r = results[j]
        if isinstance(r, str):
            rejected.append(reject(it.id, it.audio, r, it.line))
            continue
        seconds, codes = r
        meta = {
            "id": it.id,
            "task": it.task,
            "split": it.split,
            "seconds": round(seconds, 4),
            "speaker": it.speaker,
            "text": it.text,
        }
        writer.add(meta, codes, tok.encode(it.text))
        if crash_after and written + writer.items >= crash_after:
            raise RuntimeError(f"injected crash in {writer.name} after {writer.items} items ({CRASH_ENV})")
    return writer.finalize({"input": _shard_key(items), "seen": len(items), "rejected": rejected})


def _report(cfg, listing, manifest_rejects, seen, codec, elapsed, mine, shard_items) -> dict:
    entries = [e for e in listing["shards"] if e["index"] in set(mine)]
    first = cfg.slice_index == 0  # manifest-level rejections are reported once, by slice 0
    tasks: dict[str, dict] = {}
    for e in entries:
        for task, v in e["tasks"].items():
            t = tasks.setdefault(task, {"items": 0, "seconds": 0.0, "tokens": 0, "text_tokens": 0})
            for key in t:
                t[key] += v[key]
    seconds = sum(e["seconds"] for e in entries)
    return {
        "manifest": os.path.abspath(cfg.manifest),
        "out": os.path.abspath(cfg.out),
        "slice": [cfg.slice_index, cfg.num_slices],
        "seen": sum(len(shard_items[k]) for k in mine) + (len(manifest_rejects) if first else 0),
        "manifest_lines": seen,
        "accepted": sum(e["items"] for e in entries),
        "rejected": (manifest_rejects if first else []) + [r for e in entries for r in e["rejected"]],
        "tasks": {k: dict(v, seconds=round(v["seconds"], 3)) for k, v in sorted(tasks.items())},
        "shards": len(entries),
        "codec": codec.info(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "elapsed_s": round(elapsed, 3),
        "audio_seconds": round(seconds, 3),
    }


def run_cli(args) -> int:
    try:
        i, n = parse_slice(args.slice)
        cfg = PrepConfig(
            manifest=args.manifest,
            out=args.out,
            tokenizer=args.tokenizer,
            codec=args.codec,
            bandwidth=args.bandwidth,
            codec_checkpoint=args.codec_checkpoint,
            workers=args.workers,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            shard_size=args.shard_size,
            slice_index=i,
            num_slices=n,
            codec_seed=getattr(args, "codec_seed", 0),
            device=getattr(args, "device", "cpu"),
        )
        report = prep(cfg, log=lambda m: print(m, file=sys.stderr))
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = os.path.join(cfg.out, sh.report_name(i, n))
    print(
        f"[prep] seen {report['seen']}, accepted {report['accepted']}, rejected {len(report['rejected'])} "
        f"({report['audio_seconds']:.1f} s of audio in {report['elapsed_s']:.1f} s); report: {where}"
    )
    for r in report["rejected"][:10]:
        print(f"  rejected {r['id'] or 'line ' + str(r.get('line'))}: {r['reason']}", file=sys.stderr)
    if report["accepted"] == 0:
        if not report["seen"]:
            print(
                "[prep] this slice has no items" if n > 1 else "error: the manifest has no items",
                file=sys.stderr,
            )
            return 0 if n > 1 else 1
        print(
            f"error: nothing usable: all {report['seen']} items were rejected (reasons in {where})",
            file=sys.stderr,
        )
        return 1
    return 0
