"""`unimoe eval`: validation loss per task and per codebook, and the routing report.

    unimoe eval --ckpt RUN_DIR|CKPT_DIR|model.safetensors --data valid/mix.json [--out DIR]

Writes to OUT (default <ckpt>/eval): eval.json (losses), routing.json (training/eval/routing_report.py),
routing_load.png and routing_capacity.png (heatmaps), and tb/ (tensorboard scalars and the same
figures as images); with --audio-metrics also audio_metrics.json and the WAVs under audio/ (generations and
the codec's reconstruction of the references scored per task: training/eval/audio_eval.py).
The loss matches training's: per codebook the mean cross-entropy over that
codebook's audio targets, per task the sum (or mean, as the model is configured) over codebooks.
Here the means are token-weighted over the whole evaluation set, not averaged over batches.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.eval.routing_report import RoutingAccumulator, plot_report, routing_report
from training.model import IGNORE_INDEX, TASKS


class LossSums:
    """Token-weighted sums of the cross-entropy per task and codebook (on the logits' device)."""

    def __init__(self, num_codebooks: int):
        self.num = torch.zeros(len(TASKS), num_codebooks, dtype=torch.float64)
        self.den = torch.zeros(len(TASKS), num_codebooks, dtype=torch.float64)

    def update(self, model, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]  # [B, K, L]
        tok = torch.stack([model.cross_entropy(logits[:, :, k].clone(), labels[:, k])
                           for k in range(labels.shape[1])], dim=1).to(torch.float64)  # [B, K, L]
        valid = (labels != IGNORE_INDEX).to(torch.float64)
        sel = F.one_hot(batch["task"].long(), len(TASKS)).to(torch.float64)  # [B, T]
        self.num += torch.einsum("bt,bkl->tk", sel, tok * valid).cpu()
        self.den += torch.einsum("bt,bkl->tk", sel, valid).cpu()

    def values(self) -> list[float]:
        """The sums as one list (for an all-reduce over the ranks that saw different samples)."""
        return self.num.flatten().tolist() + self.den.flatten().tolist()

    def load_values(self, values: list[float]) -> None:
        n = self.num.numel()
        self.num = torch.tensor(values[:n], dtype=torch.float64).view_as(self.num)
        self.den = torch.tensor(values[n:], dtype=torch.float64).view_as(self.den)

    def result(self, reduce: str) -> dict:
        out = {"loss_per_task": {}, "loss_per_codebook": {}, "targets_per_task": {}}
        for t, task in enumerate(TASKS):
            if self.den[t].sum() == 0:
                continue
            per_cb = self.num[t] / self.den[t].clamp(min=1)
            out["loss_per_codebook"][task] = [float(x) for x in per_cb]
            out["loss_per_task"][task] = float(per_cb.sum() if reduce == "sum" else per_cb.mean())
            out["targets_per_task"][task] = int(self.den[t].sum())
        num, den = self.num.sum(0), self.den.sum(0)
        if den.sum() > 0:
            per_cb = num / den.clamp(min=1)
            out["loss_per_codebook"]["all"] = [float(x) for x in per_cb]
            out["loss"] = float(per_cb.sum() if reduce == "sum" else per_cb.mean())
        return out


@torch.no_grad()
def validation_loss(model, forward, batches, sum_over_ranks=None) -> dict:
    """Loss per task and per codebook (LossSums.result) of `model` over `batches` (collated batches, each
    rank its own share), `forward(batch)` giving the model output. `sum_over_ranks(list) -> list` adds the
    sums of the ranks that saw different samples (a collective); the training loop's validation."""
    sums = LossSums(model.cfg.num_codebooks)
    for batch in batches:
        sums.update(model, forward(batch).logits, batch)
    if sum_over_ranks is not None:
        sums.load_values(sum_over_ranks(sums.values()))
    return sums.result(model.cfg.codebook_loss)


def _moe_shape(model) -> tuple[int, int, list[int]]:
    cfg = model.cfg
    if not cfg.is_moe:
        return 0, 0, []
    moe = cfg.moe_config()
    return moe.num_routed_experts, moe.num_null_experts, cfg.moe_layer_ids


@torch.no_grad()
def evaluate_model(model, reader, batches: int = 8, batch_size: int = 8, routing: bool = True) -> dict:
    """Loss sums and routing decisions over the first batches * batch_size samples of `reader`."""
    from training.model.batch import collate

    model.eval()
    sums = LossSums(model.cfg.num_codebooks)
    num_routed, num_null, layer_ids = _moe_shape(model)
    acc = None
    if routing and layer_ids:
        acc = RoutingAccumulator(num_routed, num_null, len(layer_ids), layer_ids)
    n = min(len(reader), batches * batch_size)
    if n == 0:
        raise ValueError("evaluation data is empty")
    for start in range(0, n, batch_size):
        samples = [reader[i] for i in range(start, min(n, start + batch_size))]
        batch = collate(samples, model.cfg)
        out = model(batch)
        sums.update(model, out.logits, batch)
        if acc is not None:
            for li, aux in enumerate(out.aux):
                task_ids = getattr(aux, "task_ids", None)
                acc.update(li, aux.selected, task_ids if task_ids is not None else batch["task_ids"])
    result = sums.result(model.cfg.codebook_loss)
    result["samples"] = n
    if acc is not None:
        result["routing"] = routing_report(acc.counts(), layer_ids)
    return result


def write_report(result: dict, out_dir: str, step: int = 0) -> None:
    """eval.json, routing.json, the PNG heatmaps and tensorboard scalars/images."""
    os.makedirs(out_dir, exist_ok=True)
    routing = result.get("routing")
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "routing"}, f, indent=2)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(out_dir, "tb"))
    for task, loss in result["loss_per_task"].items():
        writer.add_scalar(f"eval/loss_{task}", loss, step)
        for k, v in enumerate(result["loss_per_codebook"][task]):
            writer.add_scalar(f"eval/loss_{task}_cb{k}", v, step)
    for kind, tasks in (result.get("audio_metrics") or {}).items():
        for task, m in (tasks.items() if kind in ("generated", "reference") else ()):
            for key, v in m.items():
                if isinstance(v, float):
                    writer.add_scalar(f"audio_{kind}/{task}_{key}", v, step)
    if routing:
        with open(os.path.join(out_dir, "routing.json"), "w") as f:
            json.dump(routing, f, indent=2)
        for name, fig in plot_report(routing).items():
            fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
            writer.add_figure(f"routing/{name}", fig, step)  # closes the figure
        for lay in routing["layers"]:
            for task in TASKS:
                writer.add_scalar(f"routing/L{lay['layer']}/experts_per_token_{task}",
                                  lay["experts_per_token"][task], step)
                writer.add_scalar(f"routing/L{lay['layer']}/null_share_{task}", lay["null_share"][task], step)
    writer.close()


@dataclass
class AudioMetricsOptions:
    """`--audio-metrics`: generate and score per task (training/eval/audio_eval.py)."""
    items_per_task: int = 8
    seed: int = 0
    references: bool = True  # also score the codec's reconstruction of the references (the ceiling)
    asr_model: str | None = None  # a local pocketsphinx acoustic model folder
    scorer: str | None = None  # a local plug-in module:function (own ASR/CLAP weights)
    tasks: tuple[str, ...] | None = None  # default: every task of the data


def evaluate(ckpt: str, data: str, out_dir: str | None = None, batches: int = 8, batch_size: int = 8,
             routing: bool = True, audio: AudioMetricsOptions | None = None) -> dict:
    """Load a checkpoint, evaluate on a mix.json, write the report; returns the result dict.
    With `audio`, also generate and score audio per task: result["audio_metrics"], audio_metrics.json."""
    from data_prep.mix import MixtureReader
    from training.checkpoint.inference import load_everything, load_model
    from training.checkpoint.tokenizers import check_model_data

    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data} does not exist (a mix.json from `unimoe data mix`)")
    loaded = load_everything(ckpt) if audio else None
    model, meta = loaded[:2] if loaded else load_model(ckpt)
    check_model_data(meta, ckpt, data, log=lambda m: print(m, file=sys.stderr))
    reader = MixtureReader(data)
    codec_model, codec_data = meta.get("codec_info") or {}, reader.codec_info or {}
    for key in ("name", "sample_rate", "num_codebooks", "codebook_size"):
        if key in codec_model and key in codec_data and codec_model[key] != codec_data[key]:
            raise ValueError(f"codec mismatch: the checkpoint was trained on codec {key}={codec_model[key]} "
                             f"but {data} holds {key}={codec_data[key]}; evaluate on data prepared with the "
                             f"same codec")
    result = evaluate_model(model, reader, batches, batch_size, routing)
    result.update(ckpt=os.path.abspath(ckpt), data=os.path.abspath(data), step=int(meta.get("step", 0) or 0),
                  codec=codec_model)
    out_dir = out_dir or os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or ".", "eval")
    if audio:
        from training.eval.audio_eval import audio_eval

        result["audio_metrics"], per_item = audio_eval(
            loaded, reader, out_dir, audio.items_per_task, audio.seed, audio.references, audio.asr_model,
            audio.scorer, audio.tasks)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "audio_metrics.json"), "w") as f:
            json.dump({**result["audio_metrics"], "items": per_item}, f, indent=2)
    write_report(result, out_dir, result["step"])
    result["out_dir"] = out_dir
    return result


def audio_summary(task: str, m: dict) -> str:
    def f(key, fmt="{:.2f}"):
        return "n/a" if m.get(key) is None else fmt.format(m[key])

    if task == "speech":
        return (f"speech DNSMOS {f('dnsmos')} WER {f('wer', '{:.0%}')} CER {f('cer', '{:.0%}')} "
                f"({m['dnsmos_scored']}/{m['clips']} clips scored)")
    floor = f" (floor {f('music_score_floor')})" if "music_score_floor" in m else ""
    scored = f"({m['music_score_scored']}/{m['clips']} clips scored)"
    return f"music caption score {f('music_score')}{floor} {scored}"


def summary_lines(result: dict) -> list[str]:
    lines = [f"validation loss ({result['samples']} samples): "
             + ", ".join(f"{t} {v:.3f}" for t, v in result["loss_per_task"].items())]
    for kind, tasks in ((k, result.get("audio_metrics", {}).get(k)) for k in ("generated", "reference")):
        if tasks:
            lines.append(f"audio ({kind}): " + "; ".join(audio_summary(task, m) for task, m in tasks.items()))
    routing = result.get("routing")
    if routing:
        s = routing["summary"]
        ept = ", ".join(f"{t} {v:.2f}" for t, v in s["experts_per_token"].items())
        null = ", ".join(f"{t} {v:.2f}" for t, v in s["null_share"].items())
        lines.append(f"routing: experts/token {ept}; null share {null}; "
                     f"speech/music divergence {s['task_divergence']:.2f}")
    return lines


def run_cli(args) -> int:
    from training.checkpoint.inference import ModelLoadError

    try:
        audio = None
        if args.audio_metrics:
            audio = AudioMetricsOptions(args.audio_items, args.seed, True, args.asr_model, args.audio_scorer)
        result = evaluate(args.ckpt, args.data, args.out, args.batches, args.batch_size, audio=audio)
    except (FileNotFoundError, ValueError, ModelLoadError) as e:
        print(f"unimoe eval: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    print(f"report: {result['out_dir']} (eval.json, routing.json, *.png, tb/)")
    return 0
