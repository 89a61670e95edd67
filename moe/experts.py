"""SwiGLU experts and the grouped GEMM they run on.

Shape legend: M = rows in groups (the (token, expert) pairs sorted by expert), D = hidden, F = expert
width, G = groups (experts).

`grouped_swiglu(x_MD, counts, offs, ...)`: the rows of group g (counts[g] of them, one after the other)
through expert g's SwiGLU. Where torch._grouped_mm's CUTLASS kernel can run (`grouped_mm_refusal` says
why not: CUDA, bf16 input and weights, D and F multiples of 8, a torch whose kernel covers the GPU) each
projection is one `torch._grouped_mm` over all experts (as in torchtitan), through `GroupedMM`, which
stacks the per-expert weights for the call and keeps only the per-expert weights for backward (no stacked
copy lives from forward to backward; backward stacks again). Elsewhere a loop runs each expert's SwiGLU
(`swiglu`, the same function as the shared experts and the benchmark's dense baseline) on its rows and
concatenates the outputs once. torch._grouped_mm also runs on CPU (a loop over the groups, slower): tests
and `bench moe` force it with `forced_path("grouped_mm")`. The path taken is logged once per reason.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the same names as the dense FFN so upcycling copies slices."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# torch release from which torch._grouped_mm has a CUTLASS kernel for a compute-capability major:
# torch 2.8 built it for sm90 only; sm100 came with 2.9.
GROUPED_MM_TORCH = {9: (2, 8), 10: (2, 9)}


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def grouped_mm_problem(device_type: str, capability: tuple[int, int] | None, torch_version: str,
                       dtypes: set, hidden: int, ffn: int) -> str | None:
    """Why torch._grouped_mm's CUTLASS kernel cannot run these experts (None: it can). dtypes: those of the
    input and of every weight; hidden (D) and ffn (F): the kernel wants 16-byte strides, i.e. multiples of
    8 bf16 values."""
    if device_type != "cuda":
        return f"tensors on {device_type}, the CUTLASS grouped GEMM needs CUDA"
    if dtypes != {torch.bfloat16}:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"input/weights in {names}, the CUTLASS grouped GEMM needs bf16 for both"
    if hidden % 8 or ffn % 8:
        return f"hidden {hidden} or expert width {ffn} is not a multiple of 8 (16-byte strides)"
    need = GROUPED_MM_TORCH.get(capability[0]) if capability else None
    if need is None:
        return f"sm{capability[0]}{capability[1]} has no CUTLASS grouped GEMM in torch (sm90/sm100 only)"
    if _version(torch_version) < need:
        return f"torch {torch_version} has no CUTLASS grouped GEMM for sm{capability[0]}x (needs >= {need})"
    return None


_FORCED: str | None = None  # "grouped_mm" or "loop": tests and `bench moe` choose the path on any device
_LOGGED: set = set()


@contextlib.contextmanager
def forced_path(path: str | None):
    """Run the experts on `path` ("grouped_mm", "loop"; None: the guard decides) inside the block."""
    global _FORCED
    if path not in (None, "grouped_mm", "loop"):
        raise ValueError(f"forced_path: {path!r} is not 'grouped_mm', 'loop' or None")
    old, _FORCED = _FORCED, path
    try:
        yield
    finally:
        _FORCED = old


def experts_path(x: torch.Tensor, w_gate: list, w_down: list) -> tuple[str, str]:
    """("grouped_mm" or "loop", why) for these experts' input and weights."""
    if _FORCED is not None:
        return _FORCED, "forced"
    if not hasattr(torch, "_grouped_mm"):
        return "loop", f"torch {torch.__version__} has no torch._grouped_mm"
    dtypes = {x.dtype} | {w.dtype for w in (*w_gate, *w_down)}
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    problem = grouped_mm_problem(x.device.type, capability, torch.__version__, dtypes, x.shape[-1],
                                 w_gate[0].shape[0])
    return ("loop", problem) if problem else ("grouped_mm", f"CUTLASS on sm{capability[0]}{capability[1]}")


def _log_path(path: str, why: str) -> None:
    if (path, why) not in _LOGGED:
        _LOGGED.add((path, why))
        name = "torch._grouped_mm" if path == "grouped_mm" else "per-expert loop"
        print(f"[moe] routed experts run on the {name} ({why})", file=sys.stderr, flush=True)


class GroupedMM(torch.autograd.Function):
    """x [M, K] times each group's weight: rows offs[g-1]:offs[g] by weights[g]^T ([N, K]) -> [M, N], one
    torch._grouped_mm. Saves the per-expert weights, not their stack: backward stacks them again."""

    @staticmethod
    def forward(ctx, x, offs, *weights):
        ctx.save_for_backward(x, offs, *weights)
        stacked = torch.stack(weights)  # [G, N, K], freed when forward returns
        return torch._grouped_mm(x, stacked.transpose(-2, -1), offs=offs)  # column-major right operand

    @staticmethod
    def backward(ctx, grad_MN):
        x, offs, *weights = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_MN, torch.stack(weights), offs=offs)
        if any(ctx.needs_input_grad[2:]):  # per group grad_g^T x_g: [G, N, K], one [N, K] per expert
            grad_w = torch._grouped_mm(grad_MN.t(), x, offs=offs).unbind(0)
        return grad_x, None, *(grad_w or [None] * len(weights))


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
           block_gates: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(x w_gate^T) * (x w_up^T)) for x [M, D]. block_gates [M, B] (optional) scales block b of
    the hidden width (F / B columns) by block_gates[:, b]: B SwiGLUs concatenated along F, each with its
    own per-row weight (down is linear, so scaling before it is the same as scaling its output)."""
    a = F.silu(x @ w_gate.t()) * (x @ w_up.t())
    if block_gates is not None:
        a = (a.unflatten(-1, (block_gates.shape[-1], -1)) * block_gates.unsqueeze(-1).to(a.dtype)).flatten(-2)
    return a @ w_down.t()


def grouped_swiglu(x_MD: torch.Tensor, counts: list[int], offs: torch.Tensor, w_gate: list, w_up: list,
                   w_down: list) -> torch.Tensor:
    """[M, D]: group g's rows through the SwiGLU (w_gate[g], w_up[g], w_down[g]); counts on the host,
    offs = int32 cumulative counts on x's device (for the CUTLASS kernel)."""
    path, why = experts_path(x_MD, w_gate, w_down)
    _log_path(path, why)
    if x_MD.shape[0] and path == "grouped_mm":
        def mm(t, w):
            return GroupedMM.apply(t, offs, *w)
        return mm(F.silu(mm(x_MD, w_gate)) * mm(x_MD, w_up), w_down)
    outs = [swiglu(xg, *w) for xg, *w in zip(x_MD.split(counts), w_gate, w_up, w_down)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def expert_weights(experts) -> tuple[list, list, list]:
    """([gate weights], [up weights], [down weights]) of a list of SwiGLU experts."""
    return ([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
            [e.down_proj.weight for e in experts])
