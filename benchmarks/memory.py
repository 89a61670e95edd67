"""Peak memory of a function: `peak_bytes(fn, device)`, the most bytes of tensor storage that fn's own
allocations held at once (what existed before fn is not counted). On CUDA: the caching allocator's peak; on
CPU (which keeps no statistics): every storage an operator returns is tracked until it is freed, forward and
backward alike (the dispatch mode is active on the thread that runs a CPU backward).

`grouped_experts_memory`: peak memory of forward + backward through a chain of MoE expert layers on the
torch._grouped_mm path, the old way (torch.stack of each projection's expert weights inside autograd, so
every layer's stacked copies stay alive until its backward) against moe.experts.GroupedMM (per-expert
weights saved, stacked again in backward). `bench moe` reports it; tests/test_moe_experts.py checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive; the peak of that sum."""

    def __init__(self, known: set):
        super().__init__()
        self.known, self.live, self.peak = known, {}, 0

    def _collect(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.known and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self._collect())
        return out


def peak_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while fn() runs, above what was allocated when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with _LiveStorages(known=set()) as mode:
        fn()
    return mode.peak


def _stacked_swiglu(x, offs, w_gate, w_up, w_down):
    """The grouped SwiGLU as it was: autograd through torch.stack keeps the stacks for backward."""
    def mm(t, w):
        return torch._grouped_mm(t, torch.stack(w).transpose(-2, -1), offs=offs)
    return mm(F.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


def grouped_experts_memory(tokens: int, hidden: int, ffn: int, experts: int, layers: int, device, dtype,
                           seed: int = 0) -> dict:
    """MiB: peak of forward + backward through `layers` expert layers (tokens spread evenly over `experts`),
    stacked (before) vs per-expert (GroupedMM), and one layer's stacked weights."""
    from moe.experts import forced_path, grouped_swiglu

    g = torch.Generator().manual_seed(seed)
    counts = [tokens // experts + (e < tokens % experts) for e in range(experts)]
    offs = torch.tensor(counts).cumsum(0).to(device=device, dtype=torch.int32)

    def weight(rows, cols):
        return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(device, dtype).requires_grad_()

    stack = [[[weight(ffn, hidden) for _ in range(experts)], [weight(ffn, hidden) for _ in range(experts)],
              [weight(hidden, ffn) for _ in range(experts)]] for _ in range(layers)]
    x0 = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=g).to(device, dtype)

    def run(layer_fn):
        def fwd_bwd():
            x = x0
            for w in stack:
                x = layer_fn(x, w)
            x.backward(grad)
        for t in [x0] + [p for w in stack for ws in w for p in ws]:
            t.grad = None
        return peak_bytes(fwd_bwd, device) / 2**20

    with forced_path("grouped_mm"):
        per_expert = run(lambda x, w: grouped_swiglu(x, counts, offs, *w))
    stacked = run(lambda x, w: _stacked_swiglu(x, offs, *w))
    return {"layers": layers, "experts": experts, "tokens": tokens, "hidden": hidden, "expert_ffn": ffn,
            "dtype": str(dtype).replace("torch.", ""), "peak_fwd_bwd_mib_stacked": stacked,
            "peak_fwd_bwd_mib_per_expert": per_expert,
            "stacked_weights_mib_per_layer": 3 * experts * ffn * hidden * x0.element_size() / 2**20}
