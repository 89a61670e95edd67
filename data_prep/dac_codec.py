"""DAC 16 kHz, the paper's codec (12 codebooks of 1024 codes at 50 frames/s, hop 320), in two backends:

    dac_16khz          the released weights: --codec-checkpoint PATH/weights_16khz.pth, else the release
                       file in the package's cache (~/.cache/descript/dac/), downloaded there when a network
                       exists; offline without a path: one line (CodecUnavailable) saying what to pass
    dac_16khz_random   the same architecture with seeded random weights, NOT trained: bit-identical on every
                       machine, thread count and process (every value from SHAKE-256 of (seed, name), as the
                       random EnCodec's, data_prep/random_codec.py), codebooks of random directions, so the
                       l2-normalized lookup spreads frames over the codes (tests and the tiny paper config)

The architecture is ours (data_prep/dac_model.py: the key map to the release, checked against the package's
module by scripts/check_dac_reference.py); the descript-audio-codec package is not needed. The release file
({"state_dict", "metadata": {"kwargs"}}) is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.codec import _run_encoder
from data_prep.codec_base import CodecUnavailable, ModelCodec
from data_prep.dac_model import DAC, DAC_16KHZ, DACConfig, WNConv, config_from_kwargs, normalize_keys
from data_prep.random_codec import _normal, _set

DAC_16KHZ_URL = "https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.5/weights_16khz.pth"
DAC_16KHZ_FILE = "weights_16khz.pth"
DAC_16KHZ_KBPS = 6.0
DAC_RANDOM_INIT = 1  # versions the construction of dac_16khz_random (info()["random_init"])
OUT_PROJ_GAIN = 2.0**-5  # dac_16khz_random: the quantizers' out_proj gain (see random_dac)


def package_cache_path() -> str:
    """Where the package's dac.utils.download keeps the 16 kHz release (tag 0.0.5, 8 kbps)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "descript", "dac", "weights_16khz_8kbps_0.0.5.pth")


def read_dac_checkpoint(path: str) -> tuple[DACConfig, dict]:
    """(architecture, state dict) of a release file, or of a bare state dict (then DAC 16 kHz is assumed)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CodecUnavailable(f"codec checkpoint not found: {path}") from None
    except Exception as e:
        raise CodecUnavailable(f"cannot load DAC checkpoint {path}: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(blob, dict):
        raise CodecUnavailable(f"cannot load DAC checkpoint {path}: expected a dict, got "
                               f"{type(blob).__name__}")
    if "state_dict" in blob:
        kwargs = (blob.get("metadata") or {}).get("kwargs") or {}
        return config_from_kwargs(kwargs) if kwargs else DAC_16KHZ, normalize_keys(blob["state_dict"])
    return DAC_16KHZ, normalize_keys(blob)


def load_dac_checkpoint(path: str) -> DAC:
    """The DAC 16 kHz model with the weights of `path`; refuses another DAC (24/44 kHz) or foreign keys."""
    cfg, state = read_dac_checkpoint(path)
    if cfg != DAC_16KHZ:
        raise CodecUnavailable(
            f"{path} is a DAC {cfg.sample_rate} Hz model ({cfg.n_codebooks} codebooks, hop "
            f"{cfg.hop_length}), not DAC 16 kHz: --codec dac_16khz needs the release's {DAC_16KHZ_FILE}")
    model = DAC(cfg)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise CodecUnavailable(
            f"{path} is not a DAC 16 kHz state dict: {len(missing)} keys missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CodecUnavailable(f"{path} does not fit DAC 16 kHz: {' '.join(str(e).split())[:200]}") from None
    return model


def _key_mismatch(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    ours = set(model.state_dict())
    return sorted(ours - set(state)), sorted(set(state) - ours)


def download_release() -> str:
    """The package's cached release file, downloaded from its release URL when absent (needs a network)."""
    path = package_cache_path()
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(DAC_16KHZ_URL, path, progress=False)
        except Exception as e:
            raise CodecUnavailable(
                f"cannot load DAC 16 kHz weights: no --codec-checkpoint given and the download of "
                f"{DAC_16KHZ_URL} failed ({type(e).__name__}; no network?). Pass --codec-checkpoint "
                f"PATH/{DAC_16KHZ_FILE}, or --codec dac_16khz_random for an untrained codec (tests only)."
            ) from None
    return path


def _symmetric32(seed: int, name: str, n: int, bound: float) -> np.ndarray:
    """n float32 values uniform in (-bound, bound) from SHAKE-256 of (seed, name), computed exactly: odd
    integers in (-2^23, 2^23) (exact in float32) times one float32 scale (one correctly rounded product
    each), so every machine gets the same bits, 4x faster than the float64 path of random_codec."""
    raw = hashlib.shake_256(f"unimoe-random-dac/{seed}/{name}".encode()).digest(4 * n)
    odd = (np.frombuffer(raw, dtype="<u4") >> 9).astype(np.int32) * 2 + (1 - 2**23)
    return odd.astype(np.float32) * np.float32(bound * 2.0**-23)


@torch.no_grad()
def random_dac(seed: int) -> DAC:
    """DAC 16 kHz with weights from SHAKE-256 of (seed, parameter name): the same bits everywhere.
    Convs: direction uniform in torch's default range (+-1/sqrt(fan_in)), gain the direction's expected
    norm (no float reduction), bias 0 (the package's init); Snake alpha 1 (the package's init); codebooks
    near-Gaussian, so their normalized vectors are random directions in the 8-d code space. The quantizers'
    out_proj gains are OUT_PROJ_GAIN of that: each codebook's contribution then has the scale of the
    encoder's latent (RMS ~0.02 at speech level), so codebook k > 0 quantizes what is left of the audio and
    not mostly the vectors of the codebooks before it (on a 2 s tone: 42-71 distinct codes per codebook
    instead of 25-36)."""
    with torch.device("meta"):  # the architecture only: no torch init, no draw from the global RNG
        model = DAC(DAC_16KHZ)
    model = model.to_empty(device="cpu")
    for name, mod in model.named_modules():
        if isinstance(mod, WNConv):
            fan_in = mod.weight_v[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            mod.weight_v.copy_(torch.from_numpy(_symmetric32(seed, name, mod.weight_v.numel(), bound))
                               .view_as(mod.weight_v))
            gain = OUT_PROJ_GAIN if name.endswith(".out_proj") else 1.0
            mod.weight_g.fill_(gain * bound * math.sqrt(fan_in / 3.0))
            mod.bias.zero_()
        elif isinstance(mod, torch.nn.Embedding):
            _set(mod.weight, _normal(seed, f"dac.{name}.weight", mod.weight.numel()))
        elif hasattr(mod, "alpha"):
            mod.alpha.fill_(1.0)
    return model


class DacCodec(ModelCodec):
    """DAC 16 kHz behind the codec interface: encode wav [B, 1, S] at 16 kHz -> codes [B, 12, ceil(S / 320)]
    (right-padded to whole hops, as the package's); decode codes [B, 12, T] -> wav [B, 1, T * 320] (the
    decoder gives T * 320 - 8 samples, as the package's; the last 8 are zero-padded)."""

    def __init__(self, model: DAC, name: str, checkpoint: str | None = None, seed: int | None = None):
        self.model, self.name, self.checkpoint, self.seed = model.eval(), name, checkpoint, seed
        cfg = model.cfg
        self.sample_rate, self.hop_length = cfg.sample_rate, cfg.hop_length
        self.frame_rate = cfg.sample_rate // cfg.hop_length
        self.num_codebooks, self.codebook_size = cfg.n_codebooks, cfg.codebook_size
        self.bandwidth = self.num_codebooks * math.log2(self.codebook_size) * self.frame_rate / 1000  # 6 kbps
        self.trained = name != "dac_16khz_random"
        self.encode_dtype = torch.float32  # the encoder's precision (data_prep.codec.set_encode_dtype)

    @torch.inference_mode()
    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))
        return self.model.quantizer.encode(_run_encoder(self, wav)).long()

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        wav = self.model.decode(codes.to(self.device))
        return F.pad(wav, (0, codes.shape[-1] * self.hop_length - wav.shape[-1]))

    def extra_info(self) -> dict:
        out = {"hop_length": self.hop_length}
        if not self.trained:
            out["random_init"] = DAC_RANDOM_INIT
            out["label"] = (f"UNTRAINED codec: DAC 16 kHz architecture, random weights (seed {self.seed}); "
                            "its codes carry no learned audio structure - for tests only")
        return out


def load_dac(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu", seed: int = 0,
             bandwidth: float | None = None) -> DacCodec:
    """The registry's loader of "dac_16khz" (the release from `checkpoint`, else the package's cache or
    download) and "dac_16khz_random" (untrained, deterministic from `seed`). DAC 16 kHz has one bandwidth,
    6 kbps (12 codebooks x 10 bits x 50 Hz): another one is refused."""
    if bandwidth is not None and float(bandwidth) != DAC_16KHZ_KBPS:
        raise ValueError(f"bandwidth {bandwidth} not supported by DAC 16 kHz: it has one, "
                         f"{DAC_16KHZ_KBPS} kbps (12 codebooks)")
    if name == "dac_16khz_random":
        return DacCodec(random_dac(seed).to(device), name, seed=seed)
    path = checkpoint or download_release()
    return DacCodec(load_dac_checkpoint(path).to(device), name, checkpoint=path)
