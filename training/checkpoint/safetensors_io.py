"""Writing a .safetensors file one tensor at a time (the header is known from the shapes up front), so an
export or a reshard of a model larger than memory holds one tensor at a time. Read back with the
`safetensors` package (`safe_open`), which also reads slices without loading the rest.

Format: little-endian u64 header length, the JSON header {name: {dtype, shape, data_offsets}} padded to
8 bytes, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple, torch.dtype]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """specs: (name, shape, dtype) in file order; produce(name) returns that tensor when it is written.
    Written to PATH.tmp, fsynced, then renamed. Returns the file size."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in specs:
                t = produce(name)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(f"{path}: {name} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} "
                                     f"{dtype}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)  # never leave a partial file that could pass for an export
        raise
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_flat_range(view, shape: tuple, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened tensor behind a safetensors slice `view`, reading
    only the rows that hold them."""
    if len(shape) <= 1:
        return view[start:start + numel]
    inner = math.prod(shape[1:])
    first, last = start // inner, -(-(start + numel) // inner)
    rows = view[first:last].reshape(-1)
    offset = start - first * inner
    return rows[offset:offset + numel]
