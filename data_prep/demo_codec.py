"""`--codec demo`: a codec fitted in seconds on the demo corpus, so the demo's WAVs can be heard.

    encode: wav 24 kHz -> STFT (n_fft 1024, hop 320: 75 frames/s) -> |X|^0.3 (513 bins) -> PCA to 128
            -> 8 levels of residual vector quantisation, 1024 entries each -> codes [8, T] (the shape of
            EnCodec 24 kHz at 6 kbps; T = ceil(S / 320) as EnCodec)
    decode: codes -> sum of the chosen entries -> PCA back -> |X| -> Griffin-Lim (32 iterations, seeded)

The fit (data_prep/demo_codec_fit.py) is deterministic: the same file, bit for bit, whatever the thread
count, in any process. The fitted codec is ONE small file (safetensors: tensors `mean`, `basis`,
`codebooks`; the settings as JSON in its header), loaded without running code; info()["checkpoint"] names
it (an exported bundle copies it). `load_codec("demo")` without a checkpoint uses the cached fit of the
demo corpus's train split, fitting it once if absent (data_prep/demo_codec_cache.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from data_prep.codec_base import AudioCodec, CodecUnavailable, fingerprint_state

FORMAT = "unimoe-demo-codec/1"


@dataclass(frozen=True)
class DemoCodecConfig:
    sample_rate: int = 24000
    n_fft: int = 1024
    hop_length: int = 320
    power: float = 0.3  # features are |X| ** power
    dims: int = 128  # PCA dimensions
    levels: int = 8  # residual codebooks
    entries: int = 1024  # codes per codebook
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99
    griffin_lim_seed: int = 0

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1


def _window(cfg: DemoCodecConfig, dtype=torch.float32) -> torch.Tensor:
    return torch.hann_window(cfg.n_fft, periodic=True, dtype=dtype)


def stft(cfg: DemoCodecConfig, wav: torch.Tensor) -> torch.Tensor:
    """wav [B, S] -> complex [B, bins, 1 + S // hop] (centred frames, zero padding at both ends)."""
    return torch.stft(wav, cfg.n_fft, cfg.hop_length, window=_window(cfg, wav.dtype).to(wav.device),
                      center=True, pad_mode="constant", return_complex=True)


def features(cfg: DemoCodecConfig, wav: torch.Tensor) -> torch.Tensor:
    """wav [B, S] -> |X| ** power [B, T, bins], T = ceil(S / hop) (EnCodec's frame count)."""
    frames = math.ceil(wav.shape[-1] / cfg.hop_length)
    return stft(cfg, wav).abs().pow(cfg.power)[..., :frames].transpose(1, 2)


def griffin_lim(cfg: DemoCodecConfig, magnitude: torch.Tensor, length: int) -> torch.Tensor:
    """magnitude [B, bins, F] -> wav [B, length]: fast Griffin-Lim (momentum), phases from a seeded draw."""
    window = _window(cfg, magnitude.dtype).to(magnitude.device)
    gen = torch.Generator().manual_seed(cfg.griffin_lim_seed)
    phase = torch.rand(magnitude.shape, generator=gen, dtype=magnitude.dtype).to(magnitude.device)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * phase)
    kw = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, window=window, center=True)
    previous = torch.zeros_like(angles)
    beta = cfg.griffin_lim_momentum / (1 + cfg.griffin_lim_momentum)
    for _ in range(cfg.griffin_lim_iters):
        wav = torch.istft(magnitude * angles, length=length, **kw)
        rebuilt = torch.stft(wav, return_complex=True, pad_mode="constant", **kw)
        angles = rebuilt - beta * previous
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return torch.istft(magnitude * angles, length=length, **kw)


def nearest(x: torch.Tensor, book: torch.Tensor, book_sq: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of book [N, D] for each row of x [M, D] (squared distance)."""
    return (book_sq[None] - 2 * x @ book.t()).argmin(1)


class DemoCodec(AudioCodec):
    """The fitted demo codec: mean [bins], basis [bins, dims] (orthonormal columns), codebooks
    [levels, entries, dims]; float32 on `device`."""

    def __init__(self, cfg: DemoCodecConfig, mean: torch.Tensor, basis: torch.Tensor, codebooks: torch.Tensor,
                 checkpoint: str | None = None, fit: dict | None = None, device: str | torch.device = "cpu"):
        self.cfg, self.fit = cfg, dict(fit or {})
        self.name, self.checkpoint, self.seed, self.trained = "demo", checkpoint, None, True
        self.sample_rate, self.hop_length = cfg.sample_rate, cfg.hop_length
        self.frame_rate = cfg.sample_rate // cfg.hop_length
        self.num_codebooks, self.codebook_size = cfg.levels, cfg.entries
        self.bandwidth = round(cfg.levels * math.log2(cfg.entries) * self.frame_rate / 1000, 3)
        self.mean, self.basis, self.codebooks = (t.to(device, torch.float32)
                                                 for t in (mean, basis, codebooks))
        self._book_sq = self.codebooks.pow(2).sum(-1)
        self._fingerprint = None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "basis": self.basis.cpu(), "codebooks": self.codebooks.cpu()}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            settings = json.dumps(asdict(self.cfg), sort_keys=True).encode()
            self._fingerprint = fingerprint_state(
                {**self.tensors(), "config": torch.tensor(list(settings), dtype=torch.uint8)})
        return self._fingerprint

    def extra_info(self) -> dict:
        return {"design": "STFT |X|^0.3 -> PCA -> residual k-means; Griffin-Lim decode", "fit": self.fit}

    @torch.inference_mode()
    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        feats = features(self.cfg, wav[:, 0].to(self.device, torch.float32))  # [B, T, bins]
        b, t, _ = feats.shape
        residual = ((feats - self.mean) @ self.basis).reshape(b * t, self.cfg.dims)
        codes = torch.empty(self.num_codebooks, b * t, dtype=torch.long, device=self.device)
        for k in range(self.num_codebooks):
            codes[k] = nearest(residual, self.codebooks[k], self._book_sq[k])
            residual = residual - self.codebooks[k][codes[k]]
        return codes.reshape(self.num_codebooks, b, t).transpose(0, 1).contiguous()

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, _, t = codes.shape
        codes = codes.to(self.device)
        z = sum(self.codebooks[k][codes[:, k]] for k in range(self.num_codebooks))  # [B, T, dims]
        if t == 0:
            return torch.zeros(b, 1, 0, device=self.device)
        magnitude = (z @ self.basis.t() + self.mean).clamp_min(0).pow(1.0 / self.cfg.power).transpose(1, 2)
        # one silent frame more: istft of T + 1 centred frames spans exactly T * hop samples
        magnitude = torch.cat([magnitude, torch.zeros_like(magnitude[..., :1])], dim=-1)
        return griffin_lim(self.cfg, magnitude, t * self.hop_length)[:, None]


def save_demo_codec(codec: DemoCodec, path: str) -> None:
    """One safetensors file (settings and fit record as JSON in its header), written atomically. One
    metadata key: safetensors writes several in hash order, which would make equal codecs differ in bytes."""
    from safetensors.torch import save_file

    meta = {"unimoe": json.dumps({"format": FORMAT, "config": asdict(codec.cfg), "fit": codec.fit,
                                  "fingerprint": codec.fingerprint()}, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in codec.tensors().items()}, tmp, metadata=meta)
    os.chmod(tmp, 0o644)  # a cache file others may read (safetensors writes it private)
    os.replace(tmp, path)


def read_demo_codec(path: str, device: str | torch.device = "cpu") -> DemoCodec:
    """Load exactly the file at `path`; CodecUnavailable says what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not os.path.isfile(path):
        raise CodecUnavailable(f"demo codec file not found: {path} (omit --codec-checkpoint to use the "
                               "cached fit of the demo corpus, fitted once if absent)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("unimoe", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:  # ValueError: also a header that is not JSON
        raise CodecUnavailable(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT or set(tensors) != {"mean", "basis", "codebooks"}:
        raise CodecUnavailable(f"{path} is not a demo codec file (format {meta.get('format')!r}, tensors "
                               f"{sorted(tensors)}; expected {FORMAT!r} with mean, basis, codebooks)")
    cfg = DemoCodecConfig(**meta["config"])
    expect = {"mean": (cfg.bins,), "basis": (cfg.bins, cfg.dims),
              "codebooks": (cfg.levels, cfg.entries, cfg.dims)}
    for k, shape in expect.items():
        if tuple(tensors[k].shape) != shape:
            raise CodecUnavailable(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, its settings "
                                   f"say {shape}: the file is damaged; fit it again")
    return DemoCodec(cfg, tensors["mean"], tensors["basis"], tensors["codebooks"],
                     checkpoint=os.path.abspath(path), fit=meta.get("fit", {}), device=device)
