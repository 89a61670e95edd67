"""Host syncs of a training micro-batch: the forward and the loss bookkeeping read nothing back to the host
but what the MoE dispatch needs (its per-expert counts, once per MoE layer); the step's metrics are read
back once, by the step's all-reduce. Counted on CPU as calls that turn a tensor into a Python value (on a
GPU each is a device-to-host sync; tests/test_gpu.py counts real ones). And the prefetcher pins the host
batches for GPU training, so their copies to the device are asynchronous.

Run: .venv/bin/pytest tests/test_host_syncs.py
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.train_inputs import make_batch, tiny_cfg
from training.cluster.parallel import all_reduce_values
from training.data import Prefetcher
from training.model import AudioLM
from training.stages import StepTokens, step_losses

MOE = {"num_routed_experts": 4, "num_null_experts": 1, "num_shared_experts": 1, "top_p": 0.7}
READBACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def _counting(monkeypatch) -> list[str]:
    calls = []
    for name in READBACKS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _micro_batch(moe):
    cfg = tiny_cfg(moe, 128, 2, 64)
    torch.manual_seed(0)
    model = AudioLM(cfg).train()
    stage_cfg = None  # step_losses reads only the model config
    return model, make_batch(cfg, 4, 24), cfg, stage_cfg


@pytest.mark.parametrize("per_token", [False, True])  # the trainer's per-global-token loss, and without
@pytest.mark.parametrize("moe", [None, MOE])
def test_forward_and_bookkeeping_read_back_only_the_dispatch_counts(monkeypatch, moe, per_token):
    model, batch, cfg, stage_cfg = _micro_batch(moe)
    tokens = StepTokens.of([batch], SimpleNamespace(dp=1), cfg.codebook_loss, "cpu") if per_token else None
    calls = _counting(monkeypatch)
    out = model(batch)
    loss, parts, _ = step_losses(out, stage_cfg, cfg, step=1, want_routing=False, tokens=tokens,
                                 task=batch["task"])
    loss.backward()
    assert calls == ([] if moe is None else ["tolist", "tolist"])  # 2 MoE layers: their dispatch counts
    monkeypatch.undo()
    # the values the step sums and all-reduces are the same as reading each back
    assert {k for k in parts if k.startswith("loss_")} == {"loss_speech", "loss_music"}
    assert float(parts["_count_loss_speech"]) == float(parts["_count_loss_music"]) == 1.0
    assert abs(float(parts["loss"]) - float(out.loss)) < 1e-5  # one micro-batch: its share is all


def test_a_task_absent_from_the_micro_batch_counts_zero():
    model, batch, cfg, stage_cfg = _micro_batch(None)
    speech = batch["task"] == 0
    only_speech = {k: v[speech] if torch.is_tensor(v) and v.shape[:1] == speech.shape else v
                   for k, v in batch.items()}
    _, parts, _ = step_losses(model(only_speech), stage_cfg, cfg, step=1, want_routing=False)
    assert float(parts["_count_loss_speech"]) == 1.0 and float(parts["_count_loss_music"]) == 0.0
    assert float(parts["loss_music"]) == 0.0 and float(parts["loss_speech"]) > 0


def test_the_step_reads_its_metrics_back_once(monkeypatch):
    values = [torch.tensor(1.5), torch.tensor(2.0), 3.0, torch.tensor(np.float32(4.0))]
    calls = _counting(monkeypatch)
    assert all_reduce_values(values) == [1.5, 2.0, 3.0, 4.0]
    assert calls == ["tolist"]


class _Steps:
    position = 0

    def step_at(self, position):
        return [{"text": torch.zeros(2, 3), "id": ["a", "b"]}], position + 1


def test_prefetcher_pins_the_host_batches_for_gpu_training(monkeypatch):
    def pin(self):
        self.pinned_here = True
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    for wanted in (True, False):
        prefetch = Prefetcher(_Steps(), pin=wanted)
        (mb,) = prefetch.next_step()
        prefetch.close()
        assert getattr(mb["text"], "pinned_here", False) == wanted and mb["id"] == ["a", "b"]
