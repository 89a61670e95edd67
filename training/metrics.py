"""Run metrics from rank 0: RUN/metrics.jsonl (one JSON object per optimizer step) + tensorboard (RUN/tb).

metrics.jsonl keys: step, loss, loss_<task> (per task present), lr, grad_norm, tokens_per_s (whole job),
skipped (cumulative count of skipped non-finite steps), mfu (per GPU, when the peak FLOP/s is known),
plus aux-loss terms. On resume from step S the lines after S (written by the interrupted run, about to be
redone) are dropped, so the file has one line per step.
MoE models add experts_per_token (routed, on steps with routing stats) for `unimoe plan --calibrate`.
"""

from __future__ import annotations

import json
import math
import os

import torch

from training.cluster.plan_time import PEAK_OVER_BF16

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10": 125e12}


def peak_flops(precision: str = "bf16") -> float | None:
    """Dense peak of this rank's GPU in `precision` (bf16, or fp32 = TF32) for the MFU estimate; None on CPU
    or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    bf16 = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None if bf16 is None else bf16 * PEAK_OVER_BF16[precision]


def mfu(tokens_per_s: float, model_cfg, seq_len: int, experts_per_token: float | None = None,
        num_gpus: int = 1, peak: float | None = None, precision: str = "bf16") -> float | None:
    """Model FLOPs utilisation per GPU: `tokens_per_s` is the whole job's throughput, spread over
    `num_gpus` GPUs (all of them: TP x DP) of `peak` FLOP/s each (default: this GPU's in `precision`, None
    on CPU)."""
    peak = peak or peak_flops(precision)
    if peak is None:
        return None
    from training.model.params import train_flops_per_token
    return tokens_per_s / num_gpus * train_flops_per_token(model_cfg, seq_len, experts_per_token) / peak


def truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by a kill -9
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1)

    def log_step(self, record: dict, scalars: dict[str, float] | None = None) -> None:
        """record -> metrics.jsonl (and tensorboard); scalars -> tensorboard only (per codebook, routing)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is None:
            return
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(_tb_name(k), v, step)
        for k, v in (scalars or {}).items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tb_name(key: str) -> str:
    if key.startswith("loss_"):
        return f"loss/{key[5:]}"
    if key == "loss":
        return "loss/total_lm"
    return f"train/{key}"
