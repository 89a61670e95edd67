"""What every audio codec backend implements (EnCodec, the random codec, the demo codec, DAC, ...).

    codec = data_prep.codec.load_codec(name, bandwidth=6.0, checkpoint=None, device="cpu", seed=0)
    codes = codec.encode(wav)     # wav [B, 1, S] float at codec.sample_rate -> codes [B, K, T] long,
                                  # T = codec.num_frames(S) = ceil(S / hop_length), 0 <= code < codebook_size
    wav = codec.decode(codes)     # [B, K, T] -> [B, 1, T * hop_length]
    codec.fingerprint()           # 16 hex digits of everything that decides the codes (prep records it)
    codec.info()                  # JSON-able dict recorded in shards.json / mix.json / checkpoint meta

A backend subclasses `AudioCodec`, sets the attributes in its constructor, implements `_encode`,
`_decode`, `fingerprint` and `device`, and may add fields to `info()` with `extra_info()`. Backends are
found by name in data_prep/codec_registry.py (no import of the backend until it is used).
"""

from __future__ import annotations

import hashlib
import math

import torch


class CodecUnavailable(RuntimeError):
    """The codec's weights cannot be loaded; the message is one line saying what to do."""


def fingerprint_state(state: dict) -> str:
    """sha256 (first 16 hex) of named tensors, in name order: the same codec in prep and generation."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class AudioCodec:
    """The codec interface. Attributes every backend sets: name, sample_rate (Hz), hop_length (samples per
    frame), frame_rate (frames/s, sample_rate / hop_length), num_codebooks (K), codebook_size, bandwidth
    (kbps, or None), trained (False: labelled UNTRAINED everywhere), checkpoint (the file its weights came
    from, or None), seed (or None)."""

    name: str
    sample_rate: int
    hop_length: int
    frame_rate: int
    num_codebooks: int
    codebook_size: int
    bandwidth: float | None = None
    trained: bool = True
    checkpoint: str | None = None
    seed: int | None = None
    encode_dtype: torch.dtype = torch.float32  # the encoder's precision, where the backend has a choice

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def num_frames(self, num_samples: int) -> int:
        return int(math.ceil(num_samples / self.hop_length))

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, S] at sample_rate -> codes [B, K, T] long, T = num_frames(S)."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"encode expects wav [B, 1, S], got {tuple(wav.shape)}")
        return self._encode(wav)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> wav [B, 1, T * hop_length]."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"decode expects codes [B, {self.num_codebooks}, T], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]"
            )
        return self._decode(codes)

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def extra_info(self) -> dict:
        """Backend-specific fields appended to info()."""
        return {}

    def info(self) -> dict:
        out = {
            "name": self.name,
            "trained": self.trained,
            "bandwidth": self.bandwidth,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "checkpoint": self.checkpoint,
            "seed": self.seed,
            "fingerprint": self.fingerprint(),
        }
        out.update(self.extra_info())
        return out


class ModelCodec(AudioCodec):
    """A backend whose codec is one torch module, `self.model`: its device, and the fingerprint of its
    weights and buffers (computed once)."""

    model: torch.nn.Module
    _fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of all weights and buffers: the same codec in prep and generation."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_state(self.model.state_dict())
        return self._fingerprint
