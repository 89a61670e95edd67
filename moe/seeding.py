"""Random numbers that are a function of *what* they are for, never of which rank draws them.

    seed = derive_seed(base, layer, "expert", g)          # a 63-bit seed from any tuple of ints/strings
    keyed_normal_(weight, std, base, layer, "expert", g)  # init from that seed (same on every layout)
    noise = keyed_uniform(token_keys_T, D, seed)          # [T, D] in [0, 1) from (seed, token key, channel)

Layout independence: an expert initialised from (seed, layer, global expert id) is the same whether one
rank draws all experts or four ranks draw a quarter each; router jitter drawn from (seed, step, layer,
global token position, channel) is the same whichever rank, micro-batch or sequence-parallel shard the
token lands on. `keyed_uniform` is a counter-based hash (integer ops on the tensor's device, no RNG state).
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF
# odd multipliers below 2**31: x (< 2**32) * c stays below 2**63, so int64 never overflows
_C1, _C2, _C3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39


def derive_seed(*key) -> int:
    """A 63-bit seed from a tuple of ints and strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_normal_(t: torch.Tensor, std: float, *key) -> torch.Tensor:
    """t <- N(0, std^2) drawn on the CPU from derive_seed(*key) (in fp32, then cast to t's dtype/device)."""
    gen = torch.Generator().manual_seed(derive_seed(*key))
    with torch.no_grad():
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
    return t


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values in [0, 2**32) to [0, 2**32) (lowbias32-style xor-shift-multiply)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 16)
    x = (x * _C3) & _M32
    return x ^ (x >> 15)


def keyed_uniform(keys: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """fp32 [T, width] uniform in [0, 1): entry (t, d) is a function of (seed, keys[t], d) only.
    keys: int64 [T] >= 0 (e.g. global sample index * 2**24 + position); negative keys (padding) are fine."""
    keys = keys.reshape(-1).to(torch.int64)
    s0, s1, s2 = seed & _M32, (seed >> 32) & _M32, derive_seed(seed, "channel") & _M32
    h = _hash32(_hash32((keys & _M32) ^ s0) ^ ((keys >> 32) & _M32) ^ s1)
    d = _hash32(torch.arange(width, device=keys.device, dtype=torch.int64) ^ s2)
    u = _hash32(h[:, None] ^ d[None, :])
    return (u >> 8).to(torch.float32) * (1.0 / (1 << 24))
