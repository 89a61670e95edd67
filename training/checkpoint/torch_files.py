"""Reading .pt files without running their code: `torch.load(weights_only=True)` with a short allow-list.

Our readers (export, reshard, stage starts, generate from a run dir) open DeepSpeed's files this way, with
the three DeepSpeed classes its ZeRO-1/2 files hold allow-listed, and memory-mapped so that only the
tensors actually read are paged in. (`--resume` at the saved layout hands the files to DeepSpeed's own
`load_checkpoint`, which unpickles them as DeepSpeed does.)
"""

from __future__ import annotations

import torch

from training.checkpoint.manifest import CheckpointError


def deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler]


def refusal_reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "global" in line.lower()]
    return (named or lines or [type(e).__name__])[0][:300]


def load_weights_only(path: str, allowed=(), mmap: bool = False):
    """torch.load(weights_only=True); any refusal becomes a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except Exception as e:  # the unpickler's refusal or a damaged file: never fall back to full pickle
        raise CheckpointError(f"{path}: refusing to load it ({refusal_reason(e)}); it holds more than "
                              "tensors and plain data, or is damaged") from None
