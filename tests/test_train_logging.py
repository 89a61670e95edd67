"""What a run reports: the line a person reads (metrics.ProgressLine), Weights & Biases through a stand-in
`wandb` module (the same scalars as tensorboard), and the config fields of both.

    .venv/bin/pytest tests/test_train_logging.py
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from training.config import ConfigError, load_config
from training.metrics import MetricsLogger, ProgressLine, loss_per_codebook

TINY = "training/configs/tiny/stage1_speech.yaml"


def _record(step, loss=56.0):
    return {"step": step, "loss": loss, "loss_speech": loss + 1, "loss_music": loss - 1,
            "loss_per_codebook": loss_per_codebook(loss, 8, "sum"), "aux_balance": 0.5, "lr": 1e-3,
            "grad_norm": 2.5, "tokens_per_s": 12345.0, "skipped": 1, "peak_memory_mib": 600.0, "mfu": 0.42}


def test_loss_per_codebook_is_the_mean_over_codebooks():
    assert loss_per_codebook(56.0, 8, "sum") == 7.0
    assert loss_per_codebook(7.0, 8, "mean") == 7.0


def test_progress_line_names_every_field():
    p = ProgressLine(first_step=1, last_step=10, num_codebooks=8, codebook_loss="sum")
    line = p.line(_record(3))
    for part in ("step 3/10", "loss 56.0000 (per token, sum over 8 codebooks; 7.0000 per codebook)",
                 "speech 57.0000", "music 55.0000", "lr 0.001", "grad norm 2.5000", "12,345 tokens/s",
                 "MFU 42.0%", "peak mem 600 MiB RSS", "skipped 1", "ETA "):
        assert part in line, (part, line)
    assert "per_codebook" not in line and "aux" not in line
    no_mfu = {k: v for k, v in _record(4).items() if k != "mfu"}
    assert "MFU n/a" in p.line(no_mfu)
    valid = ProgressLine.valid_line({"step": 4, "valid_loss": 40.0, "valid_loss_per_codebook": 5.0,
                                     "valid_loss_speech": 39.0})
    assert valid == "validation at step 4: loss 40.0000 (5.0000 per codebook) | tasks: speech 39.0000"


class _FakeWandb(types.ModuleType):
    """Records what the trainer calls on the `wandb` module."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_tensorboard_scalars(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(TINY, ["metrics.wandb={project: unimoe-test, mode: offline}"])
    run = tmp_path / "run"
    logger = MetricsLogger(str(run), True, tensorboard=True, wandb_cfg=cfg.metrics.wandb,
                           config=cfg.to_dict())
    logger.log_step(_record(1), {"codebook/0": 7.5, "routing/experts_per_token": 1.5})
    logger.log_step({**_record(2, 50.0), "valid_loss": 45.0, "valid_codebooks": {"speech": [1.0, 2.0]}})
    logger.close()
    (init,) = fake.inits
    assert init["project"] == "unimoe-test" and init["mode"] == "offline" and init["dir"] == str(run)
    assert init["config"]["metrics"]["wandb"]["project"] == "unimoe-test"
    assert init["id"] == (run / "wandb_id").read_text()  # a resumed run continues the same wandb run
    (s1, first), (s2, second) = fake.logged
    assert (s1, s2) == (1, 2)
    assert first["loss/total_lm"] == 56.0 and first["loss/speech"] == 57.0 and first["train/lr"] == 1e-3
    assert first["train/grad_norm"] == 2.5 and first["train/tokens_per_s"] == 12345.0
    assert first["codebook/0"] == 7.5 and first["routing/experts_per_token"] == 1.5
    assert second["valid/loss"] == 45.0 and "valid_codebooks" not in str(second)
    assert fake.finished == 1
    # the same scalars went to tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run / "tb"))
    ev.Reload()
    assert set(first) | set(second) == set(ev.Tags()["scalars"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["valid_codebooks"] == {"speech": [1.0, 2.0]}


def test_wandb_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="metrics.wandb.mode"):
        load_config(TINY, ["metrics.wandb={project: p, mode: sometimes}"])
    with pytest.raises(ConfigError, match="metrics.wandb.project"):
        load_config(TINY, ["metrics.wandb={mode: offline}"])
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(TINY, ["metrics.wandb={project: p, colour: red}"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    cfg = load_config(TINY, ["metrics.wandb={project: p}"])
    with pytest.raises(ConfigError, match="pip install"):
        cfg.validate(world_size=1)
    load_config(TINY).validate(world_size=1)  # no wandb section: no wandb needed


def test_validation_config_fields(tmp_path):
    with pytest.raises(ConfigError, match="needs validation data"):
        load_config(TINY, ["data.demo_valid_mix=null", "logging.eval_every=2"]).validate(world_size=1)
    with pytest.raises(ConfigError, match="logging.eval_every must be >= 0"):
        load_config(TINY, ["logging.eval_every=-1"])
    cfg = load_config(TINY, [f"data.valid={tmp_path}/none.json", "logging.eval_every=2"])
    with pytest.raises(ConfigError, match="data.valid: .*none.json does not exist"):
        cfg.validate(world_size=1)
