"""Run a small autograd subgraph (the router's [N, ~11] bookkeeping) with one CPU thread, both ways.

Router ops work on tensors of a few thousand x ~10 elements; forking the intra-op thread pool for each
costs more than the work, and on an oversubscribed machine every fork can wait a scheduler time slice
(measured: the router's forward + backward took 35x its single-thread CPU time with 2 threads at load
average ~7 on 2 cores). `serial(fn, *tensors)` runs fn's forward and, later, its backward with one
intra-op thread; the GEMMs around it keep all threads. On GPU it just calls fn.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Serial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        with torch.enable_grad(), one_thread():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            outs = fn(*leaves)
        ctx.leaves, ctx.outs = leaves, outs
        ctx.mark_non_differentiable(*[o for o in outs if not o.requires_grad])
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        leaves = ctx.leaves
        ctx.outs = ctx.leaves = None
        if pairs:
            with one_thread():
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[t.grad if t.requires_grad else None for t in leaves])


def serial(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn(*inputs) -> tuple of tensors, computed (forward and backward) with one CPU thread."""
    if inputs[0].device.type != "cpu":
        return fn(*inputs)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        with one_thread():
            return fn(*inputs)
    return _Serial.apply(fn, *inputs)
