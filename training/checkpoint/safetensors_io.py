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


class SafetensorsReader:
    """Reads tensors, or flat ranges of them, with plain file reads straight into the destination tensor:
    no memory map, so nothing but the destination counts against the process's memory."""

    _DTYPES = {v: k for k, v in DTYPES.items()}

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def keys(self):
        return self.header.keys()

    def read(self, key: str, start: int = 0, numel: int | None = None, out: torch.Tensor | None = None):
        """Elements [start, start + numel) of the flattened tensor `key` (all of it by default), into
        `out` (contiguous, of the tensor's dtype) or a new tensor shaped like the stored one."""
        entry = self.header[key]
        dtype, shape = self._DTYPES[entry["dtype"]], entry["shape"]
        whole = start == 0 and numel is None
        numel = math.prod(shape) - start if numel is None else numel
        if out is None:
            out = torch.empty(shape if whole else [numel], dtype=dtype)
        if out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
            raise ValueError(f"{self.path}: {key}: cannot read {numel} {dtype} values into "
                             f"{tuple(out.shape)} {out.dtype}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + entry["data_offsets"][0] + start * dtype.itemsize)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            while view.nbytes:
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{self.path}: file ends inside {key}")
                view = view[got:]
        return out
