"""The sections of the training config (training.config.TrainConfig holds one of each): every field with its
default and its own checks, which raise ConfigError naming the field and what to do. Also where config
files are looked up (find_file): the working directory, the checkout / installed package, training/configs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from training.cluster.gpus import gpu_preset_name

# The directory holding training/ and ds_configs/: the checkout, or site-packages after `pip install .`
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "training", "configs")


BUILTIN_CORPORA = ("demo", "fixtures_dac")  # data.builtin: the keys of data_prep.demo.BUILTIN


class ConfigError(ValueError):
    """A bad config value; the message names the field and what to do."""


@dataclass
class DataConfig:
    train: str | None = None  # mix.json of the training mixture; null = a built-in corpus (tiny configs)
    demo_mix: str = "train_balanced"  # which built-in mixture when train is null (data_prep.demo.MIXES)
    # the built-in corpus when train is null (data_prep.demo.BUILTIN): "demo" (espeak-ng speech + rendered
    # music, the demo codec) or "fixtures_dac" (numpy fixture clips, random DAC 16 kHz, 12 codebooks)
    builtin: str = "demo"
    # validation mix.json (`unimoe data mix --split valid`), evaluated every logging.eval_every steps;
    # null = none, or with train null the built-in corpus's mixture `demo_valid_mix` (e.g. valid_speech)
    valid: str | None = None
    demo_valid_mix: str | None = None
    global_batch_size: int = 8  # samples per optimizer step over all data-parallel ranks
    micro_batch_size: int | None = None  # per rank and forward pass; default global / dp (no accumulation)
    cond_drop_prob: float = 0.1  # text conditioning dropped with this probability (classifier-free guidance)
    seed: int = 0
    # token budget: each micro-batch holds as many samples as fit in batch_tokens padded positions, grouped
    # by length within the next batch_window samples; null = fixed micro_batch_size samples (training/data.py)
    batch_tokens: int | None = None
    batch_window: int = 2048
    max_open_shards: int = 64  # shards the reader keeps open (one file descriptor each; LRU)

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ConfigError(f"data.batch_tokens must be >= 1 or null, got {self.batch_tokens}")
        if self.batch_window < 1 or self.max_open_shards < 1:
            raise ConfigError(f"data.batch_window and data.max_open_shards must be >= 1, got "
                              f"{self.batch_window} and {self.max_open_shards}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"data.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.builtin not in BUILTIN_CORPORA:
            raise ConfigError(f"data.builtin must be one of {', '.join(BUILTIN_CORPORA)}, "
                              f"got {self.builtin!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # paper: 1e-4 stage 1, 3e-5 stage 2, 1e-5 stage 3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at schedule_steps
    warmup_steps: int = 100
    schedule_steps: int | None = None  # length of the cosine; default: max_steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_nonfinite_in_row: int = 10  # that many skipped (non-finite) steps in a row stop the run

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_nonfinite_in_row < 1:
            raise ConfigError("optim.max_nonfinite_in_row must be >= 1")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (megatron-core)
    ep: int = 1  # expert parallel (DeepSpeed groups); must divide the data-parallel size
    zero_stage: int = 2  # wins over the ds_config file's zero_optimization.stage
    precision: str = "fp32"  # fp32 | bf16; wins over the ds_config file
    ds_config: str = "ds_configs/zero2_fp32.json"  # absolute, or relative to the working dir or REPO_ROOT
    backend: str | None = None  # None: nccl with CUDA, gloo otherwise
    # TP > 1: norms and MoE layers work on 1/tp of the tokens (training.model.parallel_regions); None = on
    # (except under ZeRO-3, which gathers each module's weights itself)
    sequence_parallel: bool | None = None

    def __post_init__(self):
        if self.tp < 1 or self.ep < 1:
            raise ConfigError(f"parallel.tp and parallel.ep must be >= 1, got tp={self.tp} ep={self.ep}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.precision must be fp32 or bf16, got {self.precision!r}")
        if self.zero_stage == 0 and self.precision == "bf16":
            raise ConfigError("parallel.zero_stage=0 with precision=bf16 cannot run: DeepSpeed's engine "
                              "without ZeRO refuses bf16 weights with fp32 gradient accumulation "
                              "('unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype="
                              "torch.float32'), and bf16 accumulation would lose small gradients; use "
                              "zero_stage 1 or 2 with bf16, or precision fp32 with zero_stage 0")
        if self.sequence_parallel and self.tp > 1 and self.zero_stage == 3:
            raise ConfigError("parallel.sequence_parallel with zero_stage=3 is not supported (ZeRO-3 "
                              "gathers the weights inside each module, where the sequence-parallel gradient "
                              "sum cannot see them): use zero_stage 1 or 2, or sequence_parallel=false")

    def ds_config_path(self) -> str:
        return find_file(self.ds_config)

    @property
    def sequence_parallel_requested(self) -> bool:
        """Sequence parallelism for any tp > 1: as set, or by default on except under ZeRO-3."""
        return self.zero_stage != 3 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def sequence_parallel_on(self) -> bool:
        return self.tp > 1 and self.sequence_parallel_requested


@dataclass
class CheckpointConfig:
    save_every: int = 1000  # steps; 0 = only at the end and on preemption
    keep_last: int = 3  # complete checkpoints kept in RUN/checkpoints (older ones are deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, forever; 0 = none

    def __post_init__(self):
        if self.save_every < 0 or self.keep_last < 1 or self.keep_every < 0:
            raise ConfigError("checkpoint.save_every and checkpoint.keep_every must be >= 0 and "
                              "checkpoint.keep_last >= 1")


@dataclass
class LoggingConfig:
    log_every: int = 1  # metrics.jsonl gets every step; tensorboard every log_every steps
    tensorboard: bool = True
    routing_every: int = 50  # routing stats to tensorboard every N steps
    peak_flops: float | None = None  # per GPU, for the MFU estimate; None: from the GPU's name (known ones)
    # validation loss on data.valid every eval_every steps and at the last step (0 = never), on at most
    # eval_batches global batches (as Megatron's eval_iters / torchtitan's validation.steps)
    eval_every: int = 0
    eval_batches: int = 4

    def __post_init__(self):
        if self.log_every < 1 or self.routing_every < 1:
            raise ConfigError(f"logging.log_every and logging.routing_every must be >= 1, got "
                              f"{self.log_every} and {self.routing_every}")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ConfigError(f"logging.eval_every must be >= 0 (0 = no validation) and logging.eval_batches "
                              f">= 1, got {self.eval_every} and {self.eval_batches}")


WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    project: str = ""
    mode: str = "offline"  # offline: files under RUN/wandb (`wandb sync` later); online: to the server
    entity: str | None = None

    def __post_init__(self):
        if not self.project:
            raise ConfigError("metrics.wandb.project: give the Weights & Biases project name")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"metrics.wandb.mode must be one of {WANDB_MODES}, got {self.mode!r}")


@dataclass
class MetricsConfig:
    """Extra metric sinks beside metrics.jsonl and tensorboard (rank 0)."""
    wandb: WandbConfig | None = None  # {project: ..., mode: offline|online}: needs `pip install wandb`

    def __post_init__(self):
        if isinstance(self.wandb, dict):
            known = {f.name for f in dataclasses.fields(WandbConfig)}
            bad = set(self.wandb) - known
            if bad:
                raise ConfigError(f"unknown keys {sorted(bad)} in `metrics.wandb`; known: {sorted(known)}")
            self.wandb = WandbConfig(**self.wandb)


@dataclass
class StageConfig:
    stage: int = 1  # 1 dense specialist, 2 upcycle + frozen experts, 3 unfreeze all; 0 = from scratch (joint)
    init_from: list[str] = field(default_factory=list)  # stage 2: specialists' run dirs; stage 3: stage 2's
    freeze_experts: bool = False  # stage 2: train only gates, shared experts and the rest

    def __post_init__(self):
        if isinstance(self.init_from, str):
            self.init_from = [self.init_from]
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"stage.stage must be 0 (joint), 1, 2 or 3, got {self.stage}")


@dataclass
class ClusterConfig:  # the job the config is sized for: `unimoe plan` and `unimoe slurm submit` read it
    gpus: int | None = None  # total GPUs = ranks; None: not stated (the tiny CPU configs)
    gpu: str = "H100-80G"  # a planner preset (training/cluster/gpus.py), any case
    gpus_per_node: int = 8

    def __post_init__(self):
        try:
            self.gpu = gpu_preset_name(self.gpu)
        except ValueError as e:
            raise ConfigError(f"cluster.gpu: {e}") from None
        if self.gpus is not None and (not isinstance(self.gpus, int) or self.gpus < 1):
            raise ConfigError(f"cluster.gpus must be an integer >= 1 or null, got {self.gpus!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ConfigError(f"cluster.gpus_per_node must be an integer >= 1, got {self.gpus_per_node!r}")
        if self.gpus and self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(f"cluster.gpus={self.gpus} is not a whole number of nodes of "
                              f"{self.gpus_per_node} GPUs (cluster.gpus_per_node)")


def find_file(path: str) -> str:
    """A config or ds_config path as given (absolute or relative to the working directory), else relative to
    REPO_ROOT (`training/configs/tiny/joint.yaml`, `ds_configs/zero2_fp32.json`), else to training/configs
    (`tiny/joint.yaml`): the same names work in a checkout and in an installed package. A path found nowhere
    is returned as given, so the caller's error names it."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for base in (REPO_ROOT, CONFIGS_DIR):
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return candidate
    return path
