"""Run metrics from rank 0: RUN/metrics.jsonl (one JSON object per optimizer step), tensorboard (RUN/tb),
optionally Weights & Biases (`metrics.wandb`), and one line a person reads on stdout every log_every steps.

metrics.jsonl keys: step, loss, loss_<task> (per task present), loss_per_codebook, lr, grad_norm,
tokens_per_s (whole job), skipped (cumulative count of skipped non-finite steps), peak_memory_mib,
mfu (per GPU, when the peak FLOP/s is known), plus aux-loss terms; on validation steps valid_loss,
valid_loss_<task>, valid_loss_per_codebook and valid_codebooks (per task, one value per codebook).
`loss` is the language-model loss per audio token: for each codebook the mean cross-entropy over its
targets, then summed over the K codebooks (model.codebook_loss "sum", the paper's) or averaged ("mean");
`loss_per_codebook` is that total divided by K (the mean over codebooks) in both cases.
On resume from step S the lines after S (written by the interrupted run, about to be redone) are dropped,
so the file has one line per step.
MoE models add experts_per_token (routed, on steps with routing stats) for `unimoe plan --calibrate`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import time

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


def loss_per_codebook(loss: float, num_codebooks: int, codebook_loss: str) -> float:
    """The mean over codebooks of a loss that model.codebook_loss made a sum ("sum") or a mean ("mean")."""
    return loss / num_codebooks if codebook_loss == "sum" else loss


def valid_metrics(result: dict, num_codebooks: int, codebook_loss: str) -> tuple[dict, dict]:
    """(metrics.jsonl keys valid_*, tensorboard scalars per task and codebook) of a validation result
    (training.eval.evaluate.LossSums.result)."""
    record = {"valid_loss": result["loss"],
              "valid_loss_per_codebook": loss_per_codebook(result["loss"], num_codebooks, codebook_loss),
              **{f"valid_loss_{t}": v for t, v in result["loss_per_task"].items()},
              "valid_codebooks": result["loss_per_codebook"]}
    scalars = {f"valid/codebook_{t}/{k}": v for t, values in result["loss_per_codebook"].items()
               for k, v in enumerate(values)}
    return record, scalars


def peak_memory_mib(device) -> float:
    """Peak memory of this rank: allocated on its GPU, else the process's peak resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """The line rank 0 prints every log_every steps: step/total, the loss (what it is, and per codebook),
    per-task losses, lr, grad norm, tokens/s, MFU, peak memory, skipped steps and the ETA (from the mean
    step time of this process so far)."""

    def __init__(self, first_step: int, last_step: int, num_codebooks: int, codebook_loss: str,
                 on_gpu: bool = False):
        self.first_step, self.last_step = first_step, last_step
        self.memory = "GPU allocated" if on_gpu else "RSS"
        self.what = f"per token, {codebook_loss} over {num_codebooks} codebooks"
        self.t0 = time.perf_counter()

    def line(self, record: dict) -> str:
        step = record["step"]
        done = step - self.first_step + 1
        eta = (time.perf_counter() - self.t0) / max(1, done) * (self.last_step - step)
        tasks = " ".join(f"{k[5:]} {_num(v)}" for k, v in sorted(record.items())
                         if k.startswith("loss_") and k != "loss_per_codebook")
        mfu_s = f"{record['mfu']:.1%}" if record.get("mfu") is not None else "n/a"
        per_cb = _num(record["loss_per_codebook"])
        parts = [f"step {step}/{self.last_step}",
                 f"loss {_num(record['loss'])} ({self.what}; {per_cb} per codebook)",
                 f"tasks: {tasks or '-'}", f"lr {record['lr']:.3g}", f"grad norm {_num(record['grad_norm'])}",
                 f"{record['tokens_per_s']:,.0f} tokens/s", f"MFU {mfu_s}",
                 f"peak mem {record['peak_memory_mib']:,.0f} MiB {self.memory}",
                 f"skipped {record['skipped']}", f"ETA {_duration(eta)}"]
        return " | ".join(parts)

    @staticmethod
    def valid_line(record: dict) -> str:
        tasks = " ".join(f"{k[11:]} {_num(v)}" for k, v in sorted(record.items())
                         if k.startswith("valid_loss_") and k != "valid_loss_per_codebook")
        return (f"validation at step {record['step']}: loss {_num(record['valid_loss'])} "
                f"({_num(record['valid_loss_per_codebook'])} per codebook) | tasks: {tasks or '-'}")


def _num(v) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int = 0,
                 wandb_cfg=None, config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1)
        if wandb_cfg is not None:
            self.wandb = start_wandb(wandb_cfg, run_dir, config or {})

    def log_step(self, record: dict, scalars: dict[str, float] | None = None) -> None:
        """record -> metrics.jsonl (and tensorboard, wandb); scalars -> tensorboard and wandb only (per
        codebook, routing)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        step = record["step"]
        named = {_tb_name(k): v for k, v in record.items()
                 if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        named.update({k: v for k, v in (scalars or {}).items() if math.isfinite(v)})
        if self.tb is not None:
            for k, v in named.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and named:
            self.wandb.log(named, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(wandb_cfg, run_dir: str, config: dict):
    """A wandb run (the `wandb` package, an optional extra) logging to RUN/wandb; a resumed training run
    continues the same wandb run (its id is kept in RUN/wandb_id)."""
    import wandb
    id_path = os.path.join(run_dir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(6)
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                      dir=run_dir, id=run_id, resume="allow", name=config.get("name"), config=config)


def _tb_name(key: str) -> str:
    if key.startswith("valid_loss_"):
        return f"valid/loss_{key[11:]}"
    if key == "valid_loss":
        return "valid/loss"
    if key.startswith("loss_"):
        return f"loss/{key[5:]}"
    if key == "loss":
        return "loss/total_lm"
    return f"train/{key}"
