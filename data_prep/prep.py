"""`unimoe data prep`: manifest -> audio checks -> codec tokens (batched) + text ids -> indexed shards.

Pipeline: the manifest's valid lines are cut into shards of `shard_size` lines in manifest order (shard k
always holds the same lines, so re-runs and job-array slices agree; a long music line may become several
items, its windows `ID#0`, `ID#1`, ...). Audio is decoded, checked, cut, downmixed and resampled by
`workers` processes (data_prep.decode_pool: a crashed or hung decoder rejects its item only), two sort
windows ahead of the codec. The codec encodes each window of `sort_window` lines sorted by length, in
batches of at most `batch_seconds` of padded audio, and cuts each item's codes to its own frame count.
Each finished shard is written atomically and listed (data_prep.shards). Every rejected line/file goes to
the report with its reason.

Re-runs: a slice removes its report when it starts (a slice counts as done only once its report is
written again), lists the total shard count of the manifest, and keeps the listed shards whose input
(ids, tasks, audio paths relative to the manifest, texts, splits, segments) and checksums still match,
so a moved data root resumes.
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
from data_prep.audio import AudioCheckConfig, DecodeJob
from data_prep.codec import (
    CODECS,
    Codec,
    CodecUnavailable,
    load_codec,
    resolve_encode_dtype,
    set_encode_dtype,
)
from data_prep.decode_pool import DecodePool
from data_prep.manifest import ManifestItem, read_manifest, reject
from data_prep.text import Tokenizer

CRASH_ENV = "UNIMOE_PREP_CRASH_AFTER_ITEMS"  # fault injection for tests: raise after N items written this run
LIST_VERSION = 2
AHEAD_WINDOWS = 2  # sort windows decoded ahead of the codec (bounds the decoded audio held in memory)


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
    codec_dtype: str = "auto"  # encoder precision: auto = float16 on CUDA, float32 on CPU
    workers: int = 1  # decode processes (0 = decode in this process)
    threads: int | None = None  # torch threads of the codec in this process (None: leave torch's setting)
    decode_timeout: float = 300.0  # seconds one item may take in a decode worker
    min_seconds: float = 0.2
    max_seconds: float = 30.0
    window_hop: float | None = None  # music over max_seconds: a window every window_hop s (None: max_seconds)
    shard_size: int = 256
    slice_index: int = 0
    num_slices: int = 1
    sort_window: int = 64  # lines sorted by length together before batching
    batch_seconds: float | None = None  # padded audio per codec batch; None: 16 s on CPU, 300 s on CUDA
    progress: bool = True

    def __post_init__(self):
        if self.codec not in CODECS:
            raise PrepError(f"unknown codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.codec_checkpoint and not os.path.isfile(self.codec_checkpoint):
            raise PrepError(f"--codec-checkpoint {self.codec_checkpoint} does not exist")
        if self.workers < 0:
            raise PrepError(f"--workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise PrepError(f"--threads must be >= 1, got {self.threads}")
        if self.shard_size < 1 or self.sort_window < 1:
            raise PrepError("--shard-size and --sort-window must be >= 1")
        if self.decode_timeout <= 0 or (self.batch_seconds is not None and self.batch_seconds <= 0):
            raise PrepError("--decode-timeout and --batch-seconds must be > 0")
        if not 0 <= self.slice_index < self.num_slices:
            raise PrepError(f"--slice must be i/n with 0 <= i < n, got {self.slice_index}/{self.num_slices}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise PrepError(
                f"need 0 <= --min-seconds < --max-seconds, got {self.min_seconds}, {self.max_seconds}"
            )
        if self.window_hop is not None and not 0 < self.window_hop <= self.max_seconds:
            raise PrepError(f"--window-hop must be in (0, --max-seconds], got {self.window_hop}")
        if self.batch_seconds is None:
            self.batch_seconds = 16.0 if str(self.device).startswith("cpu") else 300.0
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


def _shard_key(items: list[ManifestItem], root: str) -> str:
    """What a shard was made from; audio paths relative to the manifest's folder (a moved root matches)."""
    h = hashlib.sha256()
    for it in items:
        audio = os.path.relpath(it.audio, root)
        h.update(f"{it.id}\t{it.task}\t{audio}\t{it.text}\t{it.split}\t{it.start}\t{it.end}\n".encode())
    return h.hexdigest()[:16]


def _manifest_key(keys: list[str]) -> str:
    """Of the shard keys of the whole manifest."""
    return hashlib.sha256("".join(keys).encode()).hexdigest()[:16]


def _encode_segments(codec: Codec, wavs: list[np.ndarray], batch_seconds: float) -> list[np.ndarray]:
    """Encode float32 pieces in length-sorted batches of at most batch_seconds of padded audio (a longer
    piece alone) -> codes [K, T_i] uint16 per piece, in the input order."""
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    max_samples = int(batch_seconds * codec.sample_rate)
    out: list = [None] * len(wavs)
    batch: list[int] = []

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
        if batch and len(wavs[i]) * (len(batch) + 1) > max_samples:
            flush()
        batch.append(i)
    if batch:
        flush()
    return out


def _config_record(cfg: PrepConfig, codec: Codec, tok_sha256: str, dtype: torch.dtype) -> dict:
    """What must match for listed shards to be reused (no absolute paths: a moved data root resumes)."""
    return {
        "codec": codec.fingerprint(),
        "bandwidth": codec.bandwidth,
        "codec_dtype": str(dtype).removeprefix("torch."),
        "tokenizer_sha256": tok_sha256,
        "min_seconds": cfg.min_seconds,
        "max_seconds": cfg.max_seconds,
        "window_hop": cfg.window_hop,
        "shard_size": cfg.shard_size,
    }


def _open_codec(cfg: PrepConfig, codec: Codec | None, log) -> tuple[Codec, torch.dtype]:
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
    try:
        dtype = resolve_encode_dtype(codec.device, cfg.codec_dtype)
    except ValueError as e:
        raise PrepError(str(e)) from None
    set_encode_dtype(codec, dtype)
    if not codec.trained:
        log(f"[prep] WARNING: {codec.info()['label']}")
    if codec.codebook_size > np.iinfo(np.uint16).max:
        raise PrepError(f"codebook size {codec.codebook_size} does not fit the uint16 shards")
    return codec, dtype


def _prepare_out(cfg: PrepConfig) -> None:
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PrepError(f"output directory {cfg.out} is not writable: {e.strerror}") from None
    # this slice is "done" only when its report is written again at the end of this run
    report = os.path.join(cfg.out, sh.report_name(cfg.slice_index, cfg.num_slices))
    if os.path.exists(report):
        os.remove(report)


def _todo(cfg, listing, old, mine, keys, log) -> list[int]:
    """Shards of this slice to (re)build; listing["shards"] keeps the old entries that are still good.
    keys[k]: the input key of shard k (_shard_key)."""
    if old is not None:
        if old.get("version") != LIST_VERSION or old.get("config") != listing["config"]:
            raise PrepError(
                f"{cfg.out} holds shards made with another configuration (codec, tokenizer, bounds, shard "
                "size, codec precision or an older unimoe-audio): use a new --out or remove the old one"
            )
        keep = set(mine)
        listing["shards"] = [e for e in old["shards"] if e["index"] in keep]
    done = {e["index"]: e for e in listing["shards"]}
    todo = []
    for k in mine:
        e = done.get(k)
        if e is None:
            problem = "not listed"
        elif e.get("input") != keys[k]:
            problem = "input changed"
        else:
            problem = sh.verify_entry(cfg.out, e)
        if problem is None:
            continue
        if e is not None:
            log(f"[prep] rebuilding {e['name']}: {problem}")
        todo.append(k)
    rebuild = set(todo)
    listing["shards"] = [e for e in listing["shards"] if e["index"] not in rebuild]
    if len(mine) > len(todo):
        log(f"[prep] skipping {len(mine) - len(todo)} complete shard(s) (checksums verified)")
    return todo


def prep(cfg: PrepConfig, codec: Codec | None = None, log=print) -> dict:
    """Run the pipeline for one slice; returns the report dict (also written beside the shards)."""
    t0 = time.time()
    _prepare_out(cfg)
    try:
        items, manifest_rejects, seen = read_manifest(cfg.manifest)
    except OSError as e:
        raise PrepError(f"cannot read manifest {cfg.manifest}: {e.strerror}") from None
    try:
        tok = Tokenizer(cfg.tokenizer)
    except (ValueError, RuntimeError, OSError) as e:
        raise PrepError(f"unusable tokenizer {cfg.tokenizer}: {' '.join(str(e).split())}") from None
    codec, dtype = _open_codec(cfg, codec, log)

    root = os.path.dirname(os.path.abspath(cfg.manifest))
    shard_items = [items[k : k + cfg.shard_size] for k in range(0, len(items), cfg.shard_size)]
    keys = [_shard_key(shard, root) for shard in shard_items]
    tok_sha256 = sh.sha256_file(tok.path)
    mine = [k for k in range(len(shard_items)) if k % cfg.num_slices == cfg.slice_index]
    list_path = os.path.join(cfg.out, sh.list_name(cfg.slice_index, cfg.num_slices))
    listing = {
        "version": LIST_VERSION,
        "codec": codec.info(),
        "tokenizer": {"path": tok.path, "vocab_size": tok.vocab_size, "sha256": tok_sha256},
        "config": _config_record(cfg, codec, tok_sha256, dtype),
        "slice": [cfg.slice_index, cfg.num_slices],
        "total_shards": len(shard_items),  # over all slices: the merge checks the shard indices cover it
        "manifest_key": _manifest_key(keys),  # the same in every slice made from this manifest
        "shards": [],
    }
    old = sh.load_list(list_path) if os.path.isfile(list_path) else None
    todo = _todo(cfg, listing, old, mine, keys, log)
    sh.write_json_atomic(list_path, listing)  # listed even when this slice has no shards (for the merge)
    for k in todo:  # temporary files of a crashed earlier run of these shards
        for stale in glob.glob(os.path.join(cfg.out, f".tmp.{sh.shard_name(k)}.*")):
            os.remove(stale)

    timing, restarts = _run_shards(cfg, codec, tok, todo, shard_items, keys, listing, list_path, log)
    report = _report(cfg, listing, manifest_rejects, seen, codec, time.time() - t0, mine, shard_items)
    report["timing"] = {k: round(v, 3) for k, v in timing.items()}
    report["decoder_restarts"] = restarts  # workers replaced after a crash or a timeout
    sh.write_json_atomic(os.path.join(cfg.out, sh.report_name(cfg.slice_index, cfg.num_slices)), report)
    return report


def _run_shards(cfg, codec, tok, todo, shard_items, keys, listing, list_path, log) -> tuple[dict, int]:
    """Decode, encode and write the shards `todo`; returns the main process's wall time per stage and the
    number of decode workers replaced."""
    audio_cfg = AudioCheckConfig(codec.sample_rate, cfg.min_seconds, cfg.max_seconds, cfg.window_hop)
    crash_after = int(os.environ.get(CRASH_ENV, "0")) or None
    windows = [
        (k, row, shard_items[k][row : row + cfg.sort_window])
        for k in todo
        for row in range(0, len(shard_items[k]), cfg.sort_window)
    ]
    timing = {"decode_wait_s": 0.0, "codec_s": 0.0, "write_s": 0.0}
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workers = cfg.workers if windows else 0
    if workers and mp.current_process().daemon:  # e.g. inside a DataLoader/Pool worker: no children
        log("[prep] running in a daemonic process: decoding in this process (--workers ignored)")
        workers = 0
    pool = DecodePool(workers, cfg.decode_timeout)

    def submit(w):
        k, row, block = windows[w]
        for j, it in enumerate(block):
            pool.submit((k, row + j), DecodeJob(it.audio, it.task, audio_cfg, it.start, it.end))

    written = 0
    try:
        bar = tqdm(total=sum(len(w[2]) for w in windows), desc="prep", unit="line", disable=not cfg.progress,
                   file=sys.stderr)
        for w in range(min(AHEAD_WINDOWS, len(windows))):
            submit(w)
        results: dict[int, object] = {}  # row in shard -> [(seconds, codes)] per piece, or the reason
        for w, (k, row, block) in enumerate(windows):
            if w + AHEAD_WINDOWS < len(windows):
                submit(w + AHEAD_WINDOWS)
            t = time.perf_counter()
            loaded = [pool.get((k, row + j)) for j in range(len(block))]
            timing["decode_wait_s"] += time.perf_counter() - t
            t = time.perf_counter()
            pieces = [p for ps, _ in loaded if ps is not None for p in ps]
            codes = iter(_encode_segments(codec, pieces, cfg.batch_seconds) if pieces else [])
            timing["codec_s"] += time.perf_counter() - t
            for j, (ps, reason) in enumerate(loaded):
                results[row + j] = (reason if ps is None
                                    else [(len(p) / codec.sample_rate, next(codes)) for p in ps])
            bar.update(len(block))
            if row + len(block) == len(shard_items[k]):  # last window of shard k: write it
                t = time.perf_counter()
                entry = _write_shard(cfg, k, shard_items[k], keys[k], results, tok, crash_after, written)
                written += entry["items"]
                listing["shards"].append(entry)
                listing["shards"].sort(key=lambda e: e["index"])
                sh.write_json_atomic(list_path, listing)
                results = {}
                timing["write_s"] += time.perf_counter() - t
        bar.close()
    finally:
        pool.close()
        torch.set_num_threads(threads)
    return timing, pool.restarts


def _write_shard(cfg, k, items, key, results, tok, crash_after, written) -> dict:
    writer = sh.ShardWriter(cfg.out, k)
    rejected = []
    for j, it in enumerate(items):
        r = results[j]
        if isinstance(r, str):
            rejected.append(reject(it.id, it.audio, r, it.line))
            continue
        text_ids = tok.encode(it.text)
        for w, (seconds, codes) in enumerate(r):
            meta = {
                "id": it.id if len(r) == 1 else f"{it.id}#{w}",
                "task": it.task,
                "split": it.split,
                "seconds": round(seconds, 4),
                "speaker": it.speaker,
                "text": it.text,
            }
            if len(r) > 1 or it.start is not None:  # where the item starts in the file
                meta["start"] = round((it.start or 0.0) + w * (cfg.window_hop or cfg.max_seconds), 4)
            writer.add(meta, codes, text_ids)
            if crash_after and written + writer.items >= crash_after:
                raise RuntimeError(
                    f"injected crash in {writer.name} after {writer.items} items ({CRASH_ENV})"
                )
    return writer.finalize({"input": key, "seen": len(items), "rejected": rejected})


def _report(cfg, listing, manifest_rejects, seen, codec, elapsed, mine, shard_items) -> dict:
    keep = set(mine)
    entries = [e for e in listing["shards"] if e["index"] in keep]
    first = cfg.slice_index == 0  # manifest-level rejections are reported once, by slice 0
    tasks: dict[str, dict] = {}
    for e in entries:
        for task, v in e["tasks"].items():
            t = tasks.setdefault(task, {"items": 0, "seconds": 0.0, "tokens": 0, "text_tokens": 0})
            for key in t:
                t[key] += v[key]
    seconds = sum(e["seconds"] for e in entries)
    lines = sum(len(shard_items[k]) for k in mine)
    rejected = (manifest_rejects if first else []) + [r for e in entries for r in e["rejected"]]
    return {
        "manifest": os.path.abspath(cfg.manifest),
        "out": os.path.abspath(cfg.out),
        "slice": [cfg.slice_index, cfg.num_slices],
        "seen": lines + (len(manifest_rejects) if first else 0),
        "manifest_lines": seen,
        "accepted": sum(e["items"] for e in entries),  # items written (a long music line gives several)
        "accepted_lines": lines - sum(len(e["rejected"]) for e in entries),
        "rejected": rejected,
        "tasks": {k: dict(v, seconds=round(v["seconds"], 3)) for k, v in sorted(tasks.items())},
        "shards": len(entries),
        "total_shards": len(shard_items),
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
            threads=args.threads if args.threads is not None else default_threads(args.workers, args.device),
            decode_timeout=args.decode_timeout,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            window_hop=args.window_hop,
            shard_size=args.shard_size,
            slice_index=i,
            num_slices=n,
            codec_seed=args.codec_seed,
            device=args.device,
            codec_dtype=args.codec_dtype,
            sort_window=args.sort_window,
            batch_seconds=args.batch_seconds,
        )
        report = prep(cfg, log=lambda m: print(m, file=sys.stderr))
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = os.path.join(cfg.out, sh.report_name(i, n))
    print(
        f"[prep] seen {report['seen']}, accepted {report['accepted']} items from {report['accepted_lines']} "
        f"lines, rejected {len(report['rejected'])} ({report['audio_seconds']:.1f} s of audio in "
        f"{report['elapsed_s']:.1f} s); report: {where}"
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


def default_threads(workers: int, device: str) -> int:
    """Torch threads for the codec so that threads + decode workers = the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if not str(device).startswith("cpu") else max(1, cpus - workers)
