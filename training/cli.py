"""The `unimoe` command. Each subcommand declares its flags here and runs `module:function(args)`.

The handler module is imported only when its subcommand runs, so `unimoe --help` stays fast and a
subcommand never pays for another's imports (deepspeed, encodec, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Command:
    path: tuple[str, ...]
    handler: str  # "package.module:function", called with the parsed argparse.Namespace
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda p: None)


def _train_args(p):
    p.add_argument("--config", required=True,
                   help="stage config (YAML/JSON), e.g. training/configs/tiny/joint.yaml")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this optimizer step")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in the run dir) or a path")
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed JSON (default: the config's parallel.ds_config, found in ds_configs/)")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N local processes (workstation); under torchrun/srun leave unset")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (dotted keys)")


def _plan_args(p):
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, required=True, help="total GPUs of the job")
    p.add_argument("--gpu", default="H100-80G", help="GPU preset: A100-80G, H100-80G (default), H200")
    p.add_argument("--json", action="store_true", help="the whole plan as one JSON object")
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: the preset's)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default 8")
    p.add_argument("--inter-node-gbps", type=float, default=None,
                   help="inter-node bandwidth per GPU, Gbit/s (default: the preset's NIC, 200 or 400)")
    p.add_argument("--intra-node-gbps", type=float, default=None,
                   help="NVLink bandwidth per GPU per direction, Gbit/s (default: the preset's)")
    p.add_argument("--matmul-efficiency", type=float, default=None,
                   help="fraction of the bf16 peak the matmuls reach (default 0.6)")
    p.add_argument("--overhead-gib", type=float, default=None,
                   help="fixed memory per GPU: CUDA context, NCCL, allocator reserve (default 3)")
    p.add_argument("--calibrate", default=None, metavar="RUN",
                   help="a run dir: rescale step times to its measured tokens/s (metrics.jsonl)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: model.max_seq_len)")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value")


def _generate_args(p):
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint tag or exported model.safetensors")
    p.add_argument("--task", required=True, choices=["speech", "music"])
    p.add_argument("--text", required=True, help="transcript (speech) or caption (music)")
    p.add_argument("--out", required=True, help="output WAV (with --num N: out_0.wav ...)")
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance (default per task)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-seconds", type=float, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--codec-checkpoint", default=None, help="local codec weights (default: as in the run)")


def _eval_args(p):
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="mix.json of the validation data")
    p.add_argument("--out", default=None, help="report directory (default: <ckpt>/eval)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)


def _demo_args(p):
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=12.0, help="total wall-clock budget for training")
    p.add_argument("--seed", type=int, default=0)


def _synth_args(p):
    p.add_argument("--out", required=True)
    p.add_argument("--speech", type=int, default=64)
    p.add_argument("--music", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def _import_args(p):
    p.add_argument("--format", required=True, choices=["ljspeech", "libritts", "jsonl"])
    p.add_argument("src", help="dataset root (ljspeech/libritts) or jsonl file")
    p.add_argument("--out", required=True, help="manifest.jsonl to write")
    p.add_argument("--task", default=None, choices=["speech", "music"], help="task for jsonl sources")


def _tokenizer_args(p):
    p.add_argument("--manifest", required=True, nargs="+")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--out", required=True, help="spm.model path")


def _prep_args(p):
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: <out>/../spm.model)")
    from data_prep.codec_registry import codec_names  # names only: no torch, no codec loaded

    p.add_argument("--codec", default="encodec_24khz", choices=codec_names())
    p.add_argument("--bandwidth", type=float, default=6.0)
    p.add_argument("--codec-checkpoint", default=None)
    p.add_argument("--workers", type=int, default=1, help="decode processes (0: decode in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the codec (default: usable CPUs - workers; 1 with --device cuda)")
    p.add_argument("--decode-timeout", type=float, default=300.0,
                   help="seconds one file may take to decode before it is rejected (decoder timed out)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="longest item; longer music is cut into windows, longer speech is rejected")
    p.add_argument("--min-seconds", type=float, default=0.2)
    p.add_argument("--window-hop", type=float, default=None,
                   help="seconds between the starts of a long music file's windows (default: --max-seconds)")
    p.add_argument("--shard-size", type=int, default=256, help="manifest lines per shard")
    p.add_argument("--slice", default=None, help="i/n: process the i-th of n manifest slices (job arrays)")
    p.add_argument("--codec-seed", type=int, default=0, help="seed of --codec random")
    p.add_argument("--device", default="cpu", help="where the codec encodes (cpu, cuda, cuda:1)")
    p.add_argument("--codec-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="encoder precision (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--sort-window", type=int, default=64, help="manifest lines sorted by length together")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="padded audio seconds per codec batch (default: 16 on CPU, 300 on CUDA)")


def _codec_roundtrip_args(p):
    from data_prep.codec_registry import codec_names  # names only: no torch, no codec loaded

    p.add_argument("input", help="audio file to encode (mixed to mono, resampled to the codec's rate)")
    p.add_argument("output", help="WAV of the reconstruction (at the codec's rate)")
    p.add_argument("--codec", required=True, choices=codec_names())
    p.add_argument("--codec-checkpoint", default=None, help="local codec weights (default: the codec's own)")
    p.add_argument("--task", default="speech", choices=["speech", "music"],
                   help="speech adds the speech scores (DNSMOS, WER) where training/eval/audio_metrics.py is")
    p.add_argument("--text", default=None, help="the transcript, for WER/CER")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object")


def _verify_args(p):
    p.add_argument("path", help="a prep output directory (shards.json) or a mix.json")


def _mix_args(p):
    p.add_argument("--source", action="append", required=True, help="task=DIR of prepared shards")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ratio", help="speech=1,music=1")
    group.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="manifest split to mix (train, valid, ...)")
    p.add_argument("--max-items", type=int, default=None, help="seeded subset of N items per task (seed set)")
    p.add_argument("--out", required=True)


def _export_args(p):
    p.add_argument("--ckpt", required=True, help="ZeRO checkpoint directory (a run dir or one tag)")
    p.add_argument("--out", required=True, help="model.safetensors (model.json is written beside it)")


def _reshard_args(p):
    p.add_argument("--ckpt", required=True, help="run dir (newest complete checkpoint) or checkpoints/step_*")
    p.add_argument("--tp", type=int, default=None, help="new tensor-parallel size (default: the same)")
    p.add_argument("--ep", type=int, default=None, help="new expert-parallel size (default: the same)")
    p.add_argument("--dp", type=int, default=None, help="new data-parallel size (default: the same)")
    p.add_argument("--out", required=True, help="new run dir to resume from (--out DIR --resume auto)")


def _submit_args(p):
    p.add_argument("--curriculum", required=True, help="training/configs/curriculum.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    p.add_argument("--runs", default=None, help="base directory of the run dirs (the file's `runs:`)")


def _bench_args(p):
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="smaller sizes, under a minute on 2 cores")
    p.add_argument("--device", default="cpu")


def _bench_train_args(p):
    _bench_args(p)
    p.add_argument("--tp", type=int, default=None,
                   help="TP=N (with and without sequence parallelism) beside TP=1, N processes")
    p.add_argument("--recompute", choices=["none", "block", "moe"], default=None,
                   help="peak memory and step time of this recompute mode against none")


def _bench_moe_args(p):
    _bench_args(p)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameters and activations")


def _bench_prep_args(p):
    _bench_args(p)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60.0, help="audio seconds to encode (uniform 3 s set)")
    p.add_argument("--mixed-seconds", type=float, default=600.0,
                   help="audio seconds of the mixed-length set (clips of 1-60 s); 0 skips it")


def _bench_codec_args(p):
    _bench_args(p)
    p.add_argument("--clips", type=int, default=10, help="held-out clips per task")


def _bench_reader_args(p):
    _bench_args(p)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--max-open-shards", type=int, default=64)
    p.add_argument("--reads", type=int, default=None, help="random reads (default 20000, 2000 with --quick)")


COMMANDS = [
    Command(("train",), "training.train:run_cli", "train one curriculum stage", _train_args),
    Command(("plan",), "training.cluster.plan:run_cli",
            "memory per GPU and step time of every TPxEPxDP layout, fastest first", _plan_args),
    Command(("generate",), "training.eval.generate_cli:run_cli", "sample speech or music to WAV",
            _generate_args),
    Command(("eval",), "training.eval.evaluate:run_cli", "validation loss and the routing report",
            _eval_args),
    Command(("demo",), "training.demo.run:run_cli", "the whole pipeline on the built-in corpus", _demo_args),
    Command(("data", "synth"), "data_prep.synth:run_cli", "make the built-in demo corpus", _synth_args),
    Command(("data", "import"), "data_prep.importers:run_cli", "manifest from LJSpeech/LibriTTS/jsonl",
            _import_args),
    Command(("data", "tokenizer"), "data_prep.text:run_cli", "train the sentencepiece model",
            _tokenizer_args),
    Command(("data", "prep"), "data_prep.prep:run_cli", "audio checks, codec + text tokens, shards",
            _prep_args),
    Command(("codec", "roundtrip"), "training.eval.codec_roundtrip:run_cli",
            "encode + decode one file: SC, LSD (and speech scores)", _codec_roundtrip_args),
    Command(("data", "mix"), "data_prep.mix:run_cli", "balanced speech/music mixture", _mix_args),
    Command(("data", "verify"), "data_prep.verify:run_cli", "full sha256 check of shards or a mixture",
            _verify_args),
    Command(("ckpt", "export"), "training.checkpoint.export:export_cli",
            "checkpoint to fp32 model.safetensors + model.json", _export_args),
    Command(("ckpt", "reshard"), "training.checkpoint.reshard:reshard_cli",
            "checkpoint for another TP/EP/DP layout", _reshard_args),
    Command(("slurm", "submit"), "training.cluster.slurm:run_cli", "submit the curriculum chain",
            _submit_args),
    Command(("bench", "moe"), "benchmarks.bench_moe:run_cli", "MoE layer throughput", _bench_moe_args),
    Command(("bench", "prep"), "benchmarks.bench_prep:run_cli", "codec vs pipeline throughput",
            _bench_prep_args),
    Command(("bench", "codec"), "benchmarks.bench_codec:run_cli",
            "demo vs random codec: SC/LSD on held-out speech and music, encode/decode real-time factors",
            _bench_codec_args),
    Command(("bench", "reader"), "benchmarks.bench_reader:run_cli",
            "mixture index size, open shards, random access, token-budget padding", _bench_reader_args),
    Command(("bench", "train"), "benchmarks.bench_train:run_cli", "MoE vs dense training step, TP, recompute",
            _bench_train_args),
    Command(("bench", "plan"), "benchmarks.bench_plan:run_cli", "the planner's memory and time models vs "
            "measurement", _bench_args),
    Command(("bench", "ckpt"), "benchmarks.bench_ckpt:run_cli", "checkpoint save / resume / reshard cost",
            _bench_args),
]


def _usage() -> str:
    lines = ["usage: unimoe COMMAND [args]   (unimoe COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {' '.join(c.path):<16} {c.help}" for c in COMMANDS]
    return "\n".join(lines)


def find_command(argv: list[str]) -> Command | None:
    for cmd in sorted(COMMANDS, key=lambda c: -len(c.path)):
        if tuple(argv[: len(cmd.path)]) == cmd.path:
            return cmd
    return None


def default_torch_extensions_dir() -> str:
    """Where torch builds its JIT C++ ops (DeepSpeed's CPU comm op, ~25 s to build): one per-user cache,
    independent of the checkout and the venv path, so every command on a machine reuses the same build
    (a venv at another path has other DeepSpeed source paths in the build command: ninja rebuilds it)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions")


def set_environment_defaults() -> None:
    """Defaults for every entry point (`unimoe`, `python -m training.cli`, --nproc children and SLURM ranks
    inherit or re-run them, tests/conftest.py calls this); a value the user set wins."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())


def main(argv: list[str] | None = None) -> int:
    set_environment_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = find_command(argv)
    if cmd is None:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    parser = argparse.ArgumentParser(prog="unimoe " + " ".join(cmd.path), description=cmd.help)
    cmd.add_arguments(parser)
    args = parser.parse_args(argv[len(cmd.path):])
    module_name, func_name = cmd.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
