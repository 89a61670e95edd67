"""Saving and starting a stage on 2 gloo ranks with a real DeepSpeed engine (the tiny MoE, EP 2, ZeRO 2, one
AdamW step; the engine and save are benchmarks/bench_ckpt.py's): the checkpoint takes at most 5 % more
bytes than DeepSpeed alone writes for the same engine, and a stage start (`stage.init_from`) reads only
the fp32 weights of the tensors the rank holds: no AdamW moments, no other rank's experts."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed

TINY = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 256, "max_seq_len": 128}


def _save_then_start_a_stage(rank, world_size, work):
    import deepspeed

    from benchmarks.bench_ckpt import bench_config, build_engine, step_and_save
    from training.checkpoint import zero_files
    from training.checkpoint.weights import load_weights
    from training.cluster.parallel import init_parallel
    from training.model import AudioLM
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group run_distributed started
    tc = bench_config(TINY, ep=2)
    pg = init_parallel(tc.parallel)
    engine = build_engine(tc, pg)
    step_and_save(engine, pg, tc, work)

    reads, flat_kinds = {}, set()
    read, flat = zero_files.ZeroShard.read, zero_files.ZeroShard._flat

    def recording_read(self, name, kind, shape):
        reads[name] = [part[0] for part in self.index.get(name, [])] or ["module files"]
        return read(self, name, kind, shape)

    def recording_flat(self, fname, group, kind):
        flat_kinds.add(kind)
        return flat(self, fname, group, kind)

    zero_files.ZeroShard.read, zero_files.ZeroShard._flat = recording_read, recording_flat
    torch.manual_seed(1234)  # other weights than the trained ones
    fresh = AudioLM(tc.model_config(), ep_group=pg.ep_group)
    load_weights(fresh, os.path.join(work, "run"))
    trained = engine.module.state_dict()
    return {"same": all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items()),
            "reads": reads, "flat_kinds": sorted(flat_kinds),
            "local_experts": sorted({k.split(".")[4] for k in trained if ".experts." in k})}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("ckpt"))
    return work, run_distributed(_save_then_start_a_stage, world_size=2, args=(work,), timeout=300)


def _bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_bytes_on_disk_within_5_percent_of_deepspeed_alone(saved):
    work, _ = saved
    ours = _bytes(os.path.join(work, "run", "checkpoints", "step_00000001"))
    alone = _bytes(os.path.join(work, "deepspeed_alone", "step_00000001"))
    print(f"\ncheckpoint {ours} bytes, DeepSpeed alone {alone} bytes: {ours / alone:.4f} x")
    assert ours <= 1.05 * alone


def test_a_stage_start_reads_only_the_weights_this_rank_holds(saved):
    _, results = saved
    assert [r["local_experts"] for r in results] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    for rank, r in enumerate(results):
        assert r["same"]  # the trained fp32 weights, exactly
        assert r["flat_kinds"] == ["weight"]  # never an AdamW moment
        experts = {name.split(".")[4] for name in r["reads"] if ".experts." in name}
        assert experts == set(r["local_experts"])  # only its own experts ...
        own_file = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        assert all(files == [own_file] for name, files in r["reads"].items() if ".experts." in name)
