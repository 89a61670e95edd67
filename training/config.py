"""One config tree for a training run: YAML/JSON file + dotted `key=value` overrides.

    cfg = load_config("training/configs/tiny/joint.yaml", ["optim.lr=3e-4", "parallel.ep=1"])
    cfg.validate(world_size=2)      # before any process group starts; raises ConfigError
    save_config(cfg, "RUN/config.yaml")

The sections' fields and their checks are in training/config_sections.py. `model` and `moe` hold the
keyword arguments of training.model.ModelConfig and moe.config.MoEConfig
(`moe: null` = dense FFN); `model_config()` / `moe_config()` build and validate those dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from training.config_sections import (  # noqa: F401  (re-exported: the one config tree's names)
    BUILTIN_CORPORA,
    CONFIGS_DIR,
    REPO_ROOT,
    CheckpointConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    StageConfig,
    WandbConfig,
    find_file,
)


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    max_steps: int = 1000
    model: dict = field(default_factory=dict)  # training.model.ModelConfig kwargs
    moe: dict | None = None  # moe.config.MoEConfig kwargs; null = dense FFN (stage 1)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.stage.stage == 1 and self.moe is not None:
            raise ConfigError("stage 1 trains a dense specialist: set `moe: null` "
                              "(or use stage 0 for the joint MoE)")
        if self.stage.stage in (2, 3) and self.moe is None:
            raise ConfigError(f"stage {self.stage.stage} trains the MoE model: the config needs a "
                              "`moe:` section")
        if self.stage.stage in (2, 3) and not self.stage.init_from:
            raise ConfigError(f"stage {self.stage.stage} starts from earlier runs: set stage.init_from "
                              "(stage 2: the specialists' run dirs, stage 3: the stage 2 run dir)")
        if self.moe is not None and self.parallel.zero_stage == 3:
            raise ConfigError("parallel.zero_stage=3 with an MoE model: DeepSpeed refuses MoE under ZeRO "
                              "stage 3 ('Native DeepSpeed MoE is not supported with ZeRO Stage 3'); set "
                              "parallel.zero_stage=2 (or 1) for MoE stages")
        if self.moe is None and self.parallel.ep != 1:
            raise ConfigError(f"parallel.ep={self.parallel.ep} needs an MoE model; a dense model uses ep=1")

    @property
    def has_validation(self) -> bool:
        d = self.data
        return d.valid is not None or (d.train is None and d.demo_valid_mix is not None)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def moe_config(self):
        """moe.config.MoEConfig (hidden and expert widths filled in from the model), None for dense."""
        if self.moe is None:
            return None
        try:
            return self.model_config().moe_config()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"moe: {e} (fields: see moe/config.py MoEConfig)") from e

    def model_config(self, **fill):
        """training.model.ModelConfig from `model` + `moe`; `fill` supplies keys the file leaves out
        (text_vocab_size from the tokenizer, num_codebooks/codebook_size from the codec)."""
        from training.model import ModelConfig
        kwargs = {**{k: v for k, v in fill.items() if self.model.get(k) is None}, **self.model}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs["moe"] = dict(self.moe) if self.moe is not None else None
        try:
            return ModelConfig(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e} (fields: see training/model/lm.py ModelConfig)") from e

    def layout_problems(self, world_size: int, tp: int | None = None, ep: int | None = None) -> list[str]:
        """Why this config cannot run at TP=tp, EP=ep (default: its own) on world_size ranks, in the order
        `validate` checks them; [] when it can. `unimoe plan` lists them for every layout it considers."""
        tp = self.parallel.tp if tp is None else tp
        ep = self.parallel.ep if ep is None else ep
        if world_size % tp:
            return [f"parallel.tp={tp} must divide the world size {world_size}"]
        dp = world_size // tp
        mcfg = self.model_config()
        problems = []
        n_exp = int(mcfg.moe_kwargs().get("num_routed_experts", 8)) if mcfg.is_moe else 1
        if dp % ep:  # the EP sizes that divide both the data-parallel size and the routed experts
            problems.append(f"parallel.ep={ep} must divide the data-parallel size {dp} (world {world_size} / "
                            f"tp {tp}); choose ep in {[e for e in divisors(dp) if n_exp % e == 0]}")
        if mcfg.is_moe:
            if n_exp % ep:
                problems.append(f"parallel.ep={ep} must divide moe.num_routed_experts={n_exp}")
        elif ep != 1:
            problems.append(f"parallel.ep={ep} needs an MoE model (this one is dense)")
        if mcfg.num_heads % tp:
            problems.append(f"model.num_heads={mcfg.num_heads} must be divisible by parallel.tp={tp}")
        if mcfg.num_kv_heads % tp:
            problems.append(f"model.num_kv_heads={mcfg.num_kv_heads} must be divisible by parallel.tp={tp}")
        gbs = self.data.global_batch_size
        if gbs % dp:
            problems.append(f"data.global_batch_size={gbs} must be divisible by the data-parallel size {dp}")
            return problems
        micro = self.micro_batch_size(dp)
        if self.data.batch_tokens is not None and self.data.batch_window < dp * self.grad_accum(dp):
            problems.append(f"data.batch_window={self.data.batch_window} must be >= the micro-batches per "
                            f"step ({dp * self.grad_accum(dp)} = dp x gradient accumulation)")
        if (gbs // dp) % micro:
            problems.append(f"data.micro_batch_size={micro} must divide the per-rank batch {gbs // dp} "
                            f"(global {gbs} / dp {dp})")
        return problems

    def validate(self, world_size: int) -> None:
        """Checks that need the job's size; call before any process group starts."""
        p = self.parallel
        problems = self.layout_problems(world_size)
        if problems:
            raise ConfigError(problems[0])
        if not os.path.exists(p.ds_config_path()):
            raise ConfigError(f"parallel.ds_config: {p.ds_config} does not exist (looked in the working "
                              f"directory and {REPO_ROOT}; see ds_configs/, or pass --ds-config PATH)")
        if self.data.train is not None and not os.path.exists(self.data.train):
            raise ConfigError(f"data.train: {self.data.train} does not exist "
                              "(make it with `unimoe data mix`)")
        if self.logging.eval_every and not self.has_validation:
            raise ConfigError(f"logging.eval_every={self.logging.eval_every} needs validation data: set "
                              "data.valid to a mix.json made by `unimoe data mix --split valid` (or "
                              "logging.eval_every=0)")
        if self.data.valid is not None and not os.path.exists(self.data.valid):
            raise ConfigError(f"data.valid: {self.data.valid} does not exist (make it with "
                              "`unimoe data mix ... --split valid`, or set data.valid=null)")
        if self.metrics.wandb is not None and self.metrics.wandb.mode != "disabled":
            import importlib.util
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("metrics.wandb is set but the wandb package is not installed: "
                                  "pip install 'unimoe-audio[wandb]' (or pip install wandb), or remove "
                                  "metrics.wandb")
        if self.data.train is not None:
            self.check_codec(_mix_codec(self.data.train), self.data.train)
        self.model_config()
        self.moe_config()

    def check_codec(self, info: dict, where: str) -> None:
        """The model's codebooks must be the data's: model.num_codebooks / codebook_size, when the config
        sets them, must equal the codec record of the prepared data (mix.json "codec"); left out, the model
        takes them from the data (train.py)."""
        for key in ("num_codebooks", "codebook_size"):
            want, have = self.model.get(key), info.get(key)
            if want is not None and have is not None and int(want) != int(have):
                raise ConfigError(
                    f"model.{key}={want} (config {self.name!r}) but {where} was prepared with the codec "
                    f"{info.get('name')!r}: {info.get('num_codebooks')} codebooks of "
                    f"{info.get('codebook_size')} codes at {info.get('frame_rate')} Hz. Prepare the data "
                    "with the config's codec (e.g. `unimoe data prep --codec dac_16khz` for 12 codebooks) or "
                    f"remove model.{key} so the model follows the data")

    def micro_batch_size(self, dp: int) -> int:
        return self.data.micro_batch_size or self.data.global_batch_size // dp

    def grad_accum(self, dp: int) -> int:
        return self.data.global_batch_size // (dp * self.micro_batch_size(dp))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d


def _mix_codec(mix_json: str) -> dict:
    """The codec record of a mix.json (or of a prep dir's shards.json); {} when the file has none."""
    path = os.path.join(mix_json, "shards.json") if os.path.isdir(mix_json) else mix_json
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f).get("codec") or {})
    except (OSError, ValueError, AttributeError):
        return {}  # unreadable: the reader names the problem when training opens it


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_SECTION_TYPES = {"data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig,
                  "checkpoint": CheckpointConfig, "logging": LoggingConfig, "metrics": MetricsConfig,
                  "stage": StageConfig, "cluster": ClusterConfig}


def from_dict(d: dict, source: str = "<dict>") -> TrainConfig:
    unknown = set(d) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    kwargs = {}
    for key, value in d.items():
        if key in _SECTION_TYPES:
            cls = _SECTION_TYPES[key]
            value = value or {}
            known = {f.name for f in dataclasses.fields(cls)}
            bad = set(value) - known
            if bad:
                raise ConfigError(f"{source}: unknown keys {sorted(bad)} in `{key}`; known: {sorted(known)}")
            kwargs[key] = cls(**_coerce(cls, value))
        else:
            kwargs[key] = value
    return TrainConfig(**_coerce(TrainConfig, kwargs))


def _coerce(cls, values: dict) -> dict:
    """YAML 1.1 reads `1e-4` as a string: turn numeric strings into the field's float/int."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for k, v in values.items():
        if not isinstance(v, str) or k not in types:
            continue
        try:
            if types[k].startswith("float"):
                out[k] = float(v)
            elif types[k].startswith("int"):
                out[k] = int(v)
        except ValueError:
            raise ConfigError(f"{cls.__name__.replace('Config', '').lower() or 'config'}.{k}: "
                              f"expected a number, got {v!r}") from None
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = d
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value
    return d


def read_config_file(path: str) -> dict:
    found = find_file(path)
    if not os.path.exists(found):
        raise ConfigError(f"config file {path} does not exist (looked in the working directory, {REPO_ROOT} "
                          f"and {CONFIGS_DIR})")
    with open(found) as f:
        d = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return d


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    d = apply_overrides(read_config_file(path), overrides or [])
    try:
        return from_dict(d, source=path)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from e


def save_config(cfg: TrainConfig, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
