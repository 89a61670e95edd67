"""Checks shared by the codec backends' tests."""

import torch

from data_prep.codec import set_encode_dtype


def low_precision_agreement(codec, wav: torch.Tensor) -> dict:
    """{dtype: share of codebook-0 codes equal to float32's} with the encoder under float16 / bfloat16
    autocast (the quantizer stays float32); checks shapes and dtype, restores float32."""
    ref = codec.encode(wav)
    agree = {}
    try:
        for dtype in (torch.float16, torch.bfloat16):
            set_encode_dtype(codec, dtype)
            low = codec.encode(wav)
            assert low.shape == ref.shape and low.dtype == torch.long
            agree[dtype] = (low[:, 0] == ref[:, 0]).float().mean().item()
    finally:
        set_encode_dtype(codec, torch.float32)
    return agree
