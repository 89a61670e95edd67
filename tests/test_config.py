"""The training config tree: files, overrides, and the checks that run before any process group."""

import glob
import os

import pytest

from training.config import ConfigError, TrainConfig, apply_overrides, load_config, save_config
from training.train import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "training", "configs", "tiny")


STAGE_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "training", "configs", "**", "*.yaml"),
                                            recursive=True)
                       if os.path.basename(p).startswith(("stage", "joint")))


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    cfg.model_config(text_vocab_size=512, num_codebooks=8, codebook_size=1024)
    if "tiny" in path:
        cfg.validate(world_size=2)
        assert cfg.parallel.precision == "fp32" and cfg.parallel.zero_stage == 2
        assert cfg.parallel.ep == (2 if cfg.is_moe else 1)


def test_paper_learning_rates():
    lrs = {n: load_config(os.path.join(ROOT, "training", "configs", f"{n}.yaml")).optim.lr
           for n in ("stage1_speech", "stage1_music", "stage2", "stage3")}
    assert lrs == {"stage1_speech": 1e-4, "stage1_music": 1e-4, "stage2": 3e-5, "stage3": 1e-5}


def test_overrides_are_typed_and_dotted():
    cfg = load_config(os.path.join(TINY, "joint.yaml"),
                      ["optim.lr=3e-4", "parallel.ep=1", "model.num_layers=3", "stage.init_from=[a, b]",
                       "moe.top_p=0.5"])
    assert cfg.optim.lr == 3e-4 and cfg.parallel.ep == 1 and cfg.model["num_layers"] == 3
    assert cfg.stage.init_from == ["a", "b"] and cfg.moe["top_p"] == 0.5


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(os.path.join(TINY, "stage2.yaml"))
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.ep=4"], 2, "parallel.ep=4 must divide the data-parallel size 2"),
    (["parallel.ep=2", "data.global_batch_size=6"], 3, "parallel.ep=2 must divide the data-parallel size 3"),
    (["parallel.ep=2", "moe.num_routed_experts=7"], 2, "must divide moe.num_routed_experts=7"),
    (["parallel.tp=2", "parallel.ep=1", "model.num_heads=3", "model.hidden_size=66"], 2,
     "num_heads=3 must be divisible"),
    (["data.global_batch_size=5"], 2, "global_batch_size=5 must be divisible"),
    (["parallel.ds_config=ds_configs/nope.json"], 2, "does not exist"),
    (["data.train=/no/such/mix.json"], 2, "data.train: /no/such/mix.json does not exist"),
])
def test_validate_messages(overrides, world, message):
    cfg = load_config(os.path.join(TINY, "joint.yaml"), overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        cfg.validate(world_size=world)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero_stage=3"], "DeepSpeed refuses MoE under ZeRO stage 3"),
    (["bogus=1"], "unknown top-level keys"),
    (["optim.lrr=1"], "unknown keys \\['lrr'\\] in `optim`"),
    (["stage.stage=2", "stage.init_from=[]"], "set stage.init_from"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["parallel.precision=fp16"], "fp32 or bf16"),
])
def test_load_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(TINY, "joint.yaml"), overrides)


def test_dense_stage_rules():
    with pytest.raises(ConfigError, match="dense specialist"):
        load_config(os.path.join(TINY, "stage1_speech.yaml"), ["moe={num_routed_experts: 8}"])
    with pytest.raises(ConfigError, match="needs an MoE model"):
        load_config(os.path.join(TINY, "stage1_speech.yaml"), ["parallel.ep=2"])
    # ZeRO-3 is fine for a dense specialist
    load_config(os.path.join(TINY, "stage1_speech.yaml"), ["parallel.zero_stage=3"])


def test_bad_model_field_is_a_config_error():
    cfg = load_config(os.path.join(TINY, "joint.yaml"), ["model.num_head=4"])
    with pytest.raises(ConfigError, match="model:"):
        cfg.validate(world_size=2)


def test_override_syntax():
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["optim.lr"])
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_lr_schedule_warmup_then_cosine():
    o = TrainConfig().optim
    o.lr, o.warmup_steps, o.min_lr_ratio = 1.0, 10, 0.1
    assert lr_at(5, o, 110) == pytest.approx(0.5)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)


def test_sequence_parallel_defaults_on_with_tp_and_recompute_is_checked():
    joint = os.path.join(TINY, "joint.yaml")
    assert load_config(joint, ["parallel.tp=2"]).parallel.sequence_parallel_on
    off = load_config(joint, ["parallel.tp=2", "parallel.sequence_parallel=false"])
    assert not off.parallel.sequence_parallel_on
    assert not load_config(joint).parallel.sequence_parallel_on  # tp 1: nothing to split over
    dense = os.path.join(TINY, "stage1_speech.yaml")
    assert not load_config(dense, ["parallel.tp=2", "parallel.zero_stage=3"]).parallel.sequence_parallel_on
    with pytest.raises(ConfigError, match="sequence_parallel with zero_stage=3"):
        load_config(dense, ["parallel.tp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=true"])
    assert load_config(joint, ["model.recompute=block"]).model_config().recompute == "block"
    with pytest.raises(ConfigError, match="recompute must be one of"):
        load_config(joint, ["model.recompute=all"]).model_config()
