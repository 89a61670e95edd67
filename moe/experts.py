"""SwiGLU experts and the grouped GEMM they run on.

Shape legend: M = rows in groups (the (token, expert) pairs sorted by expert), D = hidden, F = expert
width, G = groups (experts).

`grouped_swiglu(x_MD, counts, offs, ...)`: the rows of group g (counts[g] of them, one after the other)
through expert g's SwiGLU. On a GPU with CUTLASS grouped GEMM (sm90/sm100, bf16) each projection is one
`torch._grouped_mm` over all experts, on the stacked weights (as in torchtitan); elsewhere a loop runs
each expert's SwiGLU (`swiglu`, the same function as the shared experts and the benchmark's dense
baseline) on its rows and concatenates the outputs once. torch._grouped_mm itself runs there too, but
loops over the groups with the offsets copied to the host, and is slower on CPU.
"""

from __future__ import annotations

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


def cutlass_grouped_mm(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs its CUTLASS kernel for x (otherwise it loops over the groups)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] in (9, 10))


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
    if x_MD.shape[0] and cutlass_grouped_mm(x_MD):
        def mm(t, w):  # [G, F, D] viewed as [G, D, F]: the column-major right operand the kernel wants
            return torch._grouped_mm(t, torch.stack(w).transpose(-2, -1), offs=offs)
        return mm(F.silu(mm(x_MD, w_gate)) * mm(x_MD, w_up), w_down)
    outs = [swiglu(xg, *w) for xg, *w in zip(x_MD.split(counts), w_gate, w_up, w_down)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def expert_weights(experts) -> tuple[list, list, list]:
    """([gate weights], [up weights], [down weights]) of a list of SwiGLU experts."""
    return ([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
            [e.down_proj.weight for e in experts])
