"""The weights of the random codec (`--codec random`): the EnCodec 24 kHz architecture, untrained.

    done = init_random_weights(model, seed) | init_random_codebooks(model, seed)   # names of what was set

The same seed gives the bit-identical codec on every machine, thread count and process (the fingerprint
prep records is checked again before decoding), because nothing thread- or CPU-dependent reaches a weight:
- every weight is drawn from our own generator, SHAKE-256 of (seed, parameter name), with PyTorch's default
  init ranges (torch's own init draws differ between CPU instruction sets); a weight-normed conv's gain is
  the expected norm of its direction, so no float reduction is involved;
- an untrained EnCodec has all-zero codebooks (k-means on the first training batch), so every frame would
  encode to code 0: each residual codebook gets random vectors around the mean and spread of the residual
  it quantizes on a calibration signal. That encoder pass runs in float64 on one thread, and the statistics
  are rounded to a power-of-two grid of ~1/1000 of the layer's scale: the last-bit differences of float64
  math between CPUs (~1e-14 of the scale) move a value across a grid line only with vanishing probability.
`RANDOM_INIT` versions this construction (data_prep.codec records it in info()["random_init"]).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

RANDOM_INIT = 2  # construction of the random codec; 1 (before it was recorded) depended on the thread count
CALIBRATION_SECONDS = 2.0
GRID_STEPS_PER_SCALE = 512  # calibration statistics: multiples of a power of two, 1/1024..1/512 of the scale


def _bits24(seed: int, name: str, n: int) -> np.ndarray:
    """n random 24-bit integers (uint32) from SHAKE-256 of (seed, name): the same on every machine."""
    raw = hashlib.shake_256(f"unimoe-random-codec/{seed}/{name}".encode()).digest(4 * n)
    return np.frombuffer(raw, dtype="<u4") >> 8


def _uniform(seed: int, name: str, n: int) -> np.ndarray:
    """n float64 values in (0, 1): exact conversions of `_bits24`, no rounding anywhere."""
    return (_bits24(seed, name, n) + 0.5) * 2.0**-24


def _symmetric(seed: int, name: str, n: int, bound: float) -> np.ndarray:
    """Uniform in (-bound, bound), float64; each value is one correctly rounded product."""
    return bound * (2.0 * _uniform(seed, name, n) - 1.0)


def _normal(seed: int, name: str, n: int) -> np.ndarray:
    """n values with mean 0 and variance 1, close to Gaussian: (sum of 4 uniforms - 2) * sqrt(3) (Irwin-Hall;
    the sum is an exact integer sum, so the bits do not depend on how it is computed)."""
    k = _bits24(seed, name, 4 * n).reshape(n, 4)
    total = (k[:, 0] + k[:, 1] + k[:, 2] + k[:, 3]).astype(np.float64)  # < 2^26: exact
    return ((total + 2.0) * 2.0**-24 - 2.0) * math.sqrt(3.0)


def _set(t: torch.Tensor, values: np.ndarray) -> None:
    t.copy_(torch.from_numpy(values.astype(np.float32)).view_as(t))


@torch.no_grad()
def init_random_weights(model, seed: int) -> set[str]:
    """Every conv and LSTM parameter from `_symmetric` with PyTorch's default ranges; -> the names set."""
    done = set()
    for mname, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, torch.nn.LSTM):
            bound = 1.0 / math.sqrt(mod.hidden_size)
            for pname, p in params.items():
                _set(p, _symmetric(seed, f"{mname}.{pname}", p.numel(), bound))
                done.add(f"{mname}.{pname}")
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            direction = params.get("weight_v", params.get("weight"))  # weight-normed: weight = g * v / |v|
            if direction is None:  # another weight-norm implementation: reported as missing below
                continue
            fan_in = direction[0].numel()  # torch's fan_in: size(1) * kernel size, for both conv kinds
            bound = 1.0 / math.sqrt(fan_in)
            for pname, p in params.items():
                if pname == "weight_g":  # the expected norm of a weight_v row: bound * sqrt(fan_in / 3)
                    p.fill_(bound * math.sqrt(fan_in / 3.0))
                else:
                    _set(p, _symmetric(seed, f"{mname}.{pname}", p.numel(), bound))
                done.add(f"{mname}.{pname}")
    return done


def _calibration_audio(seed: int, sample_rate: int, seconds: float = CALIBRATION_SECONDS) -> torch.Tensor:
    """[1, 1, S] float64: six chirps plus gated noise, parameters from the codec's generator."""
    u = _uniform(seed, "calibration", 20)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = np.zeros_like(t)
    for i in range(6):
        f0, f1, amp = 60.0 + 3940.0 * u[3 * i], 60.0 + 3940.0 * u[3 * i + 1], 0.05 + 0.15 * u[3 * i + 2]
        x += amp * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    gate = np.sin(2 * np.pi * (0.5 + 2.5 * u[18]) * t) > 0
    x += 0.1 * gate * _symmetric(seed, "calibration-noise", len(t), math.sqrt(3.0))
    return torch.from_numpy(x).view(1, 1, -1)


def _on_grid(x: torch.Tensor, step: float) -> np.ndarray:
    return (torch.round(x / step) * step).numpy()  # step is a power of two: exact scaling


@torch.no_grad()
def init_random_codebooks(model, seed: int) -> set[str]:
    """Codebook k: random vectors (near-Gaussian, with the mean and spread per dimension of the residual left
    by codebooks < k on the calibration signal, rounded to a grid); the encoder pass is float64, one thread.
    (Gaussian rather than uniform vectors: their wider spread of norms gives codes of lower entropy, as
    trained codebooks do, which a small LM can learn.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # float32 -> float64 -> float32 is exact: the encoder's weights come back unchanged
        audio = _calibration_audio(seed, int(model.sample_rate))
        residual = model.encoder.double()(audio)[0].transpose(0, 1)  # [T, D]
        done = set()
        for i, layer in enumerate(model.quantizer.vq.layers):
            book = layer._codebook
            scale = residual.pow(2).mean().sqrt().item()
            step = 2.0 ** (math.frexp(scale)[1] - 1) / GRID_STEPS_PER_SCALE  # 2^(e-1) <= scale < 2^e
            mean = _on_grid(residual.mean(0), step)
            spread = np.maximum(_on_grid(residual.std(0), step), step)
            z = _normal(seed, f"codebook.{i}", book.embed.numel()).reshape(book.embed.shape)
            _set(book.embed, mean + spread * z)
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)
            done.update(f"quantizer.vq.layers.{i}._codebook.{b}" for b in dict(book.named_buffers()))
            embed = book.embed.double()
            dist = (residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed.t()
                    + embed.pow(2).sum(1)[None])
            residual = residual - embed[dist.argmin(1)]
    finally:
        model.encoder.float()
        torch.set_num_threads(threads)
    return done
