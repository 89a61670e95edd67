"""Audio codec behind one interface: EnCodec 24 kHz (trained weights) or the same architecture untrained.

    codec = load_codec("encodec_24khz", bandwidth=6.0, checkpoint="encodec_24khz-d7cc33bc.th")
    codes = codec.encode(wav)     # wav [B, 1, S] float at codec.sample_rate -> codes [B, K, T] long
    wav = codec.decode(codes)     # [B, K, T] -> [B, 1, S]

The torchaudio pitfall: `encodec` imports torchaudio at import time but only uses it in
`convert_audio`/`save_audio`, which we never call (WAV I/O is soundfile, resampling is data_prep.audio).
A torchaudio wheel built for another torch release fails to load its native library (OSError), which
would make `import encodec` fail. `import_encodec()` tries the real torchaudio first; if it cannot load,
it removes the half-imported torchaudio modules and installs a placeholder module named torchaudio whose
every attribute raises `TorchaudioUnavailable` with the original error, imports encodec, and takes the
placeholder out of `sys.modules` again (encodec keeps its reference): other libraries that probe for
torchaudio see the real import failure, not a module that pretends to be there.

Precision: `set_encode_dtype(codec, torch.float16)` runs the encoder under autocast (the quantizer's
nearest-code search stays float32; a batch whose half-precision embeddings are not finite is encoded again
in float32); `resolve_encode_dtype(device, "auto")` picks float16 on CUDA and float32 on CPU. float16 over
bfloat16: its 10-bit mantissa keeps the codes closer to float32's (on the random codec, 97 % of the first
codebook's codes identical against 75 % with bfloat16), and the encoder's activations fit its range.

`--codec random` ("random"): the EnCodec 24 kHz architecture with random weights from a seed, NOT trained,
bit-identical on every machine, thread count and process (how: data_prep/random_codec.py; `RANDOM_INIT`
versions that construction, info()["random_init"]). Data prepared with the older, thread-dependent random
codec has none, and is refused with a message to re-run prep (check_codec_info).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import types
import warnings
from dataclasses import dataclass

import torch

from data_prep.random_codec import RANDOM_INIT, init_random_codebooks, init_random_weights

CODECS = ("encodec_24khz", "random")
ENCODEC_24KHZ_CHECKPOINT = "encodec_24khz-d7cc33bc.th"


class CodecUnavailable(RuntimeError):
    """The codec's weights cannot be loaded; the message is one line saying what to do."""


class TorchaudioUnavailable(RuntimeError):
    pass


def _torchaudio_placeholder(error: BaseException) -> types.ModuleType:
    class _Placeholder(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise TorchaudioUnavailable(
                f"torchaudio.{name} is unavailable: the installed torchaudio cannot load next to this torch "
                f"({type(error).__name__}: {error}). unimoe-audio does not need it (soundfile does WAV I/O); "
                "install a torchaudio built for your torch release if you need it elsewhere."
            )

    mod = _Placeholder(
        "torchaudio", "placeholder installed by data_prep.codec: the real torchaudio failed to load"
    )
    mod.__spec__ = importlib.machinery.ModuleSpec("torchaudio", loader=None)
    mod.UNIMOE_PLACEHOLDER = True
    return mod


def import_encodec():
    """Import the encodec package even when torchaudio's native library cannot load (see module doc)."""
    if "encodec" in sys.modules:
        return sys.modules["encodec"]
    try:
        importlib.import_module("torchaudio")
    except Exception as e:  # OSError from the native library in practice; any failure means "unusable"
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = _torchaudio_placeholder(e)
    try:
        return importlib.import_module("encodec")
    finally:
        _drop_torchaudio_placeholder()


def _drop_torchaudio_placeholder() -> None:
    """Take our placeholder out of sys.modules once encodec holds it (see the module docstring)."""
    if getattr(sys.modules.get("torchaudio"), "UNIMOE_PLACEHOLDER", False):
        del sys.modules["torchaudio"]


def resolve_encode_dtype(device: str | torch.device, name: str = "auto") -> torch.dtype:
    """The encoder's precision: float32 | bfloat16 | float16, or auto (float16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--codec-dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def set_encode_dtype(codec: "Codec", dtype: torch.dtype) -> None:
    codec.encode_dtype = dtype


def _run_encoder(codec: "Codec", wav: torch.Tensor) -> torch.Tensor:
    """The encoder's embeddings (float32) for wav [B, 1, S], under autocast when encode_dtype asks for it."""
    x = wav.to(codec.device, torch.float32)
    if codec.encode_dtype == torch.float32:
        return codec.model.encoder(x)
    with torch.autocast(codec.device.type, dtype=codec.encode_dtype):
        emb = codec.model.encoder(x).float()
    return emb if torch.isfinite(emb).all() else codec.model.encoder(x)


@dataclass
class Codec:
    """A loaded codec: `model` is an encodec.EncodecModel in eval mode."""

    model: torch.nn.Module
    name: str
    bandwidth: float
    checkpoint: str | None = None
    seed: int | None = None
    encode_dtype: torch.dtype = torch.float32  # the encoder's precision (set_encode_dtype)

    def __post_init__(self):
        self.model.set_target_bandwidth(self.bandwidth)
        self.sample_rate = int(self.model.sample_rate)
        self.frame_rate = int(self.model.frame_rate)
        self.hop_length = self.sample_rate // self.frame_rate
        self.codebook_size = int(self.model.quantizer.bins)
        self.num_codebooks = int(
            self.model.quantizer.get_num_quantizers_for_bandwidth(self.model.frame_rate, self.bandwidth)
        )
        self.trained = self.name != "random"
        self._fingerprint = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        return int(math.ceil(num_samples / self.hop_length))

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, S] at sample_rate -> codes [B, K, T] long, T = ceil(S / hop)."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"encode expects wav [B, 1, S], got {tuple(wav.shape)}")
        emb = _run_encoder(self, wav)
        codes = self.model.quantizer.encode(emb, self.model.frame_rate, self.bandwidth)  # [K, B, T]
        return codes.transpose(0, 1).long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> wav [B, 1, T * hop]."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"decode expects codes [B, {self.num_codebooks}, T], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]"
            )
        emb = self.model.quantizer.decode(codes.to(self.device).transpose(0, 1))
        return self.model.decoder(emb)[..., : codes.shape[-1] * self.hop_length]

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of all weights and buffers: the same codec in prep and generation."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

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
        if not self.trained:
            out["random_init"] = RANDOM_INIT
            out["label"] = (
                f"UNTRAINED codec: EnCodec 24 kHz architecture, random weights (seed {self.seed}); "
                "its codes carry no learned audio structure - for tests and the demo only"
            )
        return out


def _random_model(encodec, seed: int):
    with torch.device("meta"):  # the architecture only: no torch init, no draw from the global RNG
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    model = model.to_empty(device="cpu")
    done = init_random_weights(model, seed) | init_random_codebooks(model, seed)
    missing = sorted(set(model.state_dict()) - done)
    if missing:  # a newer encodec with other modules: they would hold uninitialised memory
        raise CodecUnavailable(f"random codec: no deterministic init for {', '.join(missing[:5])} (this "
                               f"encodec version has modules the random codec does not know)")
    return model


def _build(encodec, name: str, checkpoint: str | None, seed: int):
    if name == "random":
        model = _random_model(encodec, seed)
    else:
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        if checkpoint is not None:
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise CodecUnavailable(f"codec checkpoint not found: {checkpoint}") from None
            except Exception as e:
                raise CodecUnavailable(
                    f"cannot read codec checkpoint {checkpoint}: {type(e).__name__}: {e}"
                ) from None
            try:
                model.load_state_dict(state)
            except Exception as e:
                raise CodecUnavailable(
                    f"{checkpoint} is not an EnCodec 24 kHz state dict: {' '.join(str(e).split())[:200]}"
                ) from None
        else:
            try:
                model.load_state_dict(encodec.EncodecModel._get_pretrained(ENCODEC_24KHZ_CHECKPOINT, None))
            except Exception as e:
                raise CodecUnavailable(
                    "EnCodec 24 kHz weights unavailable: no --codec-checkpoint given and the download "
                    f"failed ({type(e).__name__}; no network?). Pass --codec-checkpoint "
                    f"PATH/{ENCODEC_24KHZ_CHECKPOINT}, "
                    "or --codec random for an untrained codec (tests/demo only)."
                ) from None
    return model


def load_codec(
    name: str = "encodec_24khz",
    bandwidth: float = 6.0,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Codec:
    """Build a codec. name: "encodec_24khz" (trained weights from `checkpoint`, else the package's
    download) or "random" (untrained, deterministic from `seed`). Raises CodecUnavailable / ValueError."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}")
    encodec = import_encodec()
    with warnings.catch_warnings():  # encodec's weight_norm deprecation notice, once per model build
        warnings.simplefilter("ignore", FutureWarning)
        model = _build(encodec, name, checkpoint, seed)
    model.eval().to(device)
    valid = [b for b in model.target_bandwidths]
    if bandwidth not in valid:
        raise ValueError(f"bandwidth {bandwidth} not supported by EnCodec 24 kHz: choose one of {valid}")
    return Codec(
        model, name, float(bandwidth), checkpoint=checkpoint, seed=seed if name == "random" else None
    )


def check_codec_info(info: dict, where: str) -> None:
    """Refuse codes made by the older random codec, whose weights depended on the CPU thread count: it
    cannot be rebuilt reliably, so its data (and models trained on it) cannot be decoded. One line says
    what to do."""
    if info.get("name") == "random" and info.get("random_init") != RANDOM_INIT:
        raise CodecUnavailable(
            f"{where} was made with an older random codec (random_init {info.get('random_init', 1)}, now "
            f"{RANDOM_INIT}) whose weights depended on the CPU thread count, so it cannot be rebuilt to "
            "decode these codes: re-run `unimoe data prep --codec random` (then `unimoe data mix`, and train "
            "again); the demo rebuilds its own corpus"
        )


def load_codec_from_info(
    info: dict, checkpoint: str | None = None, device: str | torch.device = "cpu", where: str = "the data"
) -> Codec:
    """Rebuild the codec recorded by prep (shards.json / mix.json "codec"); checks the fingerprint."""
    check_codec_info(info, where)
    codec = load_codec(
        info["name"],
        info["bandwidth"],
        checkpoint or info.get("checkpoint"),
        device,
        seed=info.get("seed") or 0,
    )
    if info.get("fingerprint") and codec.fingerprint() != info["fingerprint"]:
        raise CodecUnavailable(
            f"codec weights differ from the ones used in prep (fingerprint "
            f"{codec.fingerprint()} != {info['fingerprint']}): pass the same checkpoint/seed"
        )
    return codec
