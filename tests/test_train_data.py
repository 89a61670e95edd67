"""Token-budget batches (data.batch_tokens): grouped by length, deterministic by position, resumable.

Run: .venv/bin/pytest tests/test_train_data.py
"""

import numpy as np
import pytest

from data_prep.fixtures import write_synthetic_shards
from data_prep.mix import build_mix
from training.config import ConfigError, load_config
from training.data import (
    DistributedBatches,
    Prefetcher,
    open_reader,
    pack_sorted,
    padding_fraction,
    plan_token_step,
    sequence_length,
)
from training.model import ModelConfig

MODEL = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_codebooks=8, codebook_size=1024,
                    text_vocab_size=64, delay_pattern="musicgen", max_seq_len=512)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_synthetic_shards(str(root / "prep"), items=600, shards=6)
    build_mix([("speech", str(root / "prep")), ("music", str(root / "prep"))], str(root / "mix.json"),
              ratio={"speech": 1, "music": 1})

    class Cfg:
        max_open_shards = 4

    return open_reader(Cfg, str(root / "mix.json"))


def test_pack_and_plan():
    lengths = np.array([50, 10, 40, 10, 30, 20, 90, 20])
    groups = pack_sorted(lengths, 60)
    assert [lengths[g].tolist() for g in groups] == [[10, 10, 20], [20, 30], [40], [50], [90]]
    # the longest prefix that fits 3 micro-batches: 50 10 40 10 -> [10 10] [40] [50]; with 30: 4 are needed
    n, groups = plan_token_step(lengths, 60, 3)
    assert n == 4 and [lengths[g].tolist() for g in groups] == [[10, 10], [40], [50]]
    assert all(len(g) * lengths[g].max() <= 60 for g in groups)
    n, groups = plan_token_step(np.full(8, 10), 1000, 4)  # all fit one: split into 4 non-empty
    assert n == 8 and [len(g) for g in groups] == [2, 2, 2, 2]


def _batches(reader, dp_rank=0, dp=1, position=0, tokens=600, global_batch=4, micro=2):
    return DistributedBatches(reader, MODEL, global_batch, micro, dp_rank, dp, position=position,
                              batch_tokens=tokens, batch_window=256)


def test_token_budget_steps_cover_the_mixture_in_order_and_resume(reader):
    ranks = [_batches(reader, r, 2, tokens=600, global_batch=4, micro=1) for r in range(2)]  # 2 x 2 per step
    position = 0
    for _ in range(5):
        plans = [b.plan(position) for b in ranks]
        ends = {end for _, end in plans}
        assert len(ends) == 1  # every rank computes the same step on its own
        end = ends.pop()
        taken = sorted(position + int(i) for groups, _ in plans for g in groups for i in g)
        assert taken == list(range(position, end))  # a contiguous run of the mixture, each sample once
        for groups, _ in plans:
            assert len(groups) == 2
            for g in groups:
                lengths = [sequence_length(*reader.lengths(position + int(i)), MODEL) for i in g]
                assert len(g) == 1 or len(g) * max(lengths) <= 600
        position = end
    # resume: a fresh object at a saved position gives the same micro-batches as the one that ran there
    a = _batches(reader)
    for _ in range(3):
        a.next_step()
    saved = a.state_dict()
    want = a.next_step()
    b = _batches(reader)
    b.load_state_dict(saved)
    got = b.next_step()
    assert b.position == a.position and len(got) == len(want) == 2
    for x, y in zip(got, want):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # the prefetcher walks the same steps
    c, d = _batches(reader), _batches(reader)
    pre = Prefetcher(d)
    for _ in range(3):
        x, y = c.next_step(), pre.next_step()
        assert [m["text"].shape for m in x] == [m["text"].shape for m in y] and c.position == d.position
    pre.close()


def test_collated_sizes_match_the_plan_and_padding_drops(reader):
    tokens = _batches(reader, tokens=600)
    fixed = DistributedBatches(reader, MODEL, 8, 8, 0, 1)
    for _ in range(4):
        for mb in tokens.next_step():
            B, L = mb["valid"].shape
            assert B == 1 or B * L <= 600
    pads = [padding_fraction(tokens.batches_at(p)) for p in range(0, 400, 37)]
    fixed_pads = [padding_fraction(fixed.batches_at(p)) for p in range(0, 400, 37)]
    assert np.mean(pads) < np.mean(fixed_pads)


def test_config_fields(tmp_path):
    cfg = load_config("tiny/joint.yaml", ["data.batch_tokens=2048", "data.max_open_shards=8"])
    assert cfg.data.batch_tokens == 2048 and cfg.data.max_open_shards == 8
    with pytest.raises(ConfigError, match="data.batch_tokens"):
        load_config("tiny/joint.yaml", ["data.batch_tokens=0"])
    bad = load_config("tiny/joint.yaml", ["data.batch_tokens=2048", "data.batch_window=1"])
    with pytest.raises(ConfigError, match="data.batch_window=1 must be >= the micro-batches per step"):
        bad.validate(world_size=2)


def test_training_with_a_token_budget_logs_the_padding_fraction(tmp_path):
    from tests.train_runs import metrics, run, train_cmd

    out = str(tmp_path / "run")
    p = run(train_cmd("joint.yaml", out, "--max-steps", "2", "parallel.ep=1", "data.batch_tokens=1024",
                      "data.micro_batch_size=2", "data.max_open_shards=2", nproc=1))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m = metrics(out)
    assert sorted(m) == [1, 2] and all(0.0 <= m[s]["padding_fraction"] < 1.0 for s in m)
