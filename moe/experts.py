"""SwiGLU experts on one grouped GEMM.

Shape legend: M = rows in groups (the (token, expert) pairs sorted by expert, or all tokens as one group),
D = hidden, F = expert width, G = groups.

`grouped_mm(x_MD, w, counts, offs)`: the rows of group g (counts[g] of them, one after the other) times
w[g]^T. On a GPU with CUTLASS grouped GEMM (sm90/sm100, bf16) that is `torch._grouped_mm` on the stacked
weights, as in torchtitan; elsewhere a loop of one GEMM per group (torch's own fallback does the same,
but needs the offsets on the host). `grouped_swiglu` runs the routed experts, the shared experts
(concatenated along F, one group) and the benchmark's dense baseline, so all of them use the same kernels.
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


def grouped_mm(x_MD: torch.Tensor, w: list[torch.Tensor], counts: list[int],
               offs: torch.Tensor | None = None) -> torch.Tensor:
    """[M, F]: rows of group g times w[g]^T (w[g] [F, D]); counts on the host, offs = int32 cumulative
    counts on x's device (needed for the CUTLASS kernel only)."""
    if len(w) == 1:
        return x_MD @ w[0].t()
    if offs is not None and x_MD.shape[0] and cutlass_grouped_mm(x_MD):
        # [G, F, D] viewed as [G, D, F]: the column-major right operand the kernel wants
        return torch._grouped_mm(x_MD, torch.stack(w).transpose(-2, -1), offs=offs)
    return torch.cat([xg @ wg.t() for xg, wg in zip(x_MD.split(counts), w)])


def grouped_swiglu(x_MD: torch.Tensor, counts: list[int], offs: torch.Tensor | None, w_gate: list, w_up: list,
                   w_down: list, block_gates: torch.Tensor | None = None) -> torch.Tensor:
    """[M, D]: group g's rows through the SwiGLU (w_gate[g], w_up[g], w_down[g]). block_gates [M, B]
    (optional) scales block b of the hidden width (F / B columns) by block_gates[:, b]: B SwiGLUs
    concatenated along F, each with its own per-row weight (down is linear, so scaling before it is
    the same as scaling its output)."""
    a = F.silu(grouped_mm(x_MD, w_gate, counts, offs)) * grouped_mm(x_MD, w_up, counts, offs)
    if block_gates is not None:
        a = (a.unflatten(-1, (block_gates.shape[-1], -1)) * block_gates.unsqueeze(-1).to(a.dtype)).flatten(-2)
    return grouped_mm(a, w_down, counts, offs)


def expert_weights(experts) -> tuple[list, list, list]:
    """([gate weights], [up weights], [down weights]) of a list of SwiGLU experts."""
    return ([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
            [e.down_proj.weight for e in experts])
