"""Audio codecs behind one interface (data_prep/codec_base.py), found by name (data_prep/codec_registry.py);
this module loads them and holds the EnCodec 24 kHz backend (trained weights) and its untrained twin.

    codec = load_codec("encodec_24khz", bandwidth=6.0, checkpoint="encodec_24khz-d7cc33bc.th")
    codes = codec.encode(wav)     # wav [B, 1, S] float at codec.sample_rate -> codes [B, K, T] long
    wav = codec.decode(codes)     # [B, K, T] -> [B, 1, S]
    codec = load_codec_from_info(shards_json["codec"])   # the codec prep recorded; fingerprint checked

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

import importlib
import os
import sys
import types
import warnings

import torch

from data_prep.codec_base import AudioCodec, CodecUnavailable, ModelCodec
from data_prep.codec_registry import REBUILDS_DEFAULT, backend_loader, codec_names
from data_prep.random_codec import RANDOM_INIT, init_random_codebooks, init_random_weights

__all__ = ["AudioCodec", "Codec", "CodecUnavailable", "EncodecCodec", "load_codec", "load_codec_from_info"]
CODECS = codec_names()
ENCODEC_24KHZ_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
Codec = AudioCodec  # the type every backend's codec has (kept for older call sites)


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


def set_encode_dtype(codec: AudioCodec, dtype: torch.dtype) -> None:
    codec.encode_dtype = dtype


def _run_encoder(codec: "EncodecCodec", wav: torch.Tensor) -> torch.Tensor:
    """The encoder's embeddings (float32) for wav [B, 1, S], under autocast when encode_dtype asks for it."""
    x = wav.to(codec.device, torch.float32)
    if codec.encode_dtype == torch.float32:
        return codec.model.encoder(x)
    with torch.autocast(codec.device.type, dtype=codec.encode_dtype):
        emb = codec.model.encoder(x).float()
    return emb if torch.isfinite(emb).all() else codec.model.encoder(x)


class EncodecCodec(ModelCodec):
    """EnCodec 24 kHz ("encodec_24khz", trained weights) or its random twin ("random"): `model` is an
    encodec.EncodecModel in eval mode."""

    def __init__(self, model: torch.nn.Module, name: str, bandwidth: float, checkpoint: str | None = None,
                 seed: int | None = None):
        self.model, self.name, self.bandwidth = model, name, bandwidth
        self.checkpoint, self.seed = checkpoint, seed
        self.encode_dtype = torch.float32  # the encoder's precision (set_encode_dtype)
        self.model.set_target_bandwidth(self.bandwidth)
        self.sample_rate = int(self.model.sample_rate)
        self.frame_rate = int(self.model.frame_rate)
        self.hop_length = self.sample_rate // self.frame_rate
        self.codebook_size = int(self.model.quantizer.bins)
        self.num_codebooks = int(
            self.model.quantizer.get_num_quantizers_for_bandwidth(self.model.frame_rate, self.bandwidth)
        )
        self.trained = self.name != "random"

    @torch.inference_mode()
    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        emb = _run_encoder(self, wav)
        codes = self.model.quantizer.encode(emb, self.model.frame_rate, self.bandwidth)  # [K, B, T]
        return codes.transpose(0, 1).long()

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        emb = self.model.quantizer.decode(codes.to(self.device).transpose(0, 1))
        return self.model.decoder(emb)[..., : codes.shape[-1] * self.hop_length]

    def extra_info(self) -> dict:
        if self.trained:
            return {}
        return {
            "random_init": RANDOM_INIT,
            "label": (
                f"UNTRAINED codec: EnCodec 24 kHz architecture, random weights (seed {self.seed}); "
                "its codes carry no learned audio structure - for tests and the demo only"
            ),
        }


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


def load_encodec(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu", seed: int = 0,
                 bandwidth: float | None = 6.0) -> EncodecCodec:
    """The registry's loader of "encodec_24khz" (trained weights from `checkpoint`, else the package's
    download) and "random" (untrained, deterministic from `seed`)."""
    bandwidth = 6.0 if bandwidth is None else bandwidth
    encodec = import_encodec()
    with warnings.catch_warnings():  # encodec's weight_norm deprecation notice, once per model build
        warnings.simplefilter("ignore", FutureWarning)
        model = _build(encodec, name, checkpoint, seed)
    model.eval().to(device)
    valid = [b for b in model.target_bandwidths]
    if bandwidth not in valid:
        raise ValueError(f"bandwidth {bandwidth} not supported by EnCodec 24 kHz: choose one of {valid}")
    return EncodecCodec(
        model, name, float(bandwidth), checkpoint=checkpoint, seed=seed if name == "random" else None
    )


def load_codec(
    name: str = "encodec_24khz",
    bandwidth: float | None = 6.0,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> AudioCodec:
    """Build codec `name` (see data_prep/codec_registry.py for the names): "encodec_24khz" (trained weights
    from `checkpoint`, else the package's download), "random" (untrained, deterministic from `seed`), ...
    Raises CodecUnavailable / ValueError with a message saying what to do."""
    loader = backend_loader(name)
    return loader(name=name, checkpoint=checkpoint, device=device, seed=seed, bandwidth=bandwidth)


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


def _default_in_place_of(info: dict, missing: str, device, where: str) -> AudioCodec:
    """The backend's own default codec (the demo codec refits deterministically) for a record whose file is
    gone, accepted only when its fingerprint is the recorded one."""
    try:
        codec = load_codec(info["name"], None, None, device)
    except ValueError as e:
        codec, problem = None, " ".join(str(e).split())
    if codec is not None and codec.fingerprint() == info.get("fingerprint"):
        return codec
    if codec is not None:
        problem = f"fingerprint {codec.fingerprint()} != {info.get('fingerprint')}"
    raise CodecUnavailable(
        f"{where}: its {info['name']} codec file {missing} is gone and the default {info['name']} codec is "
        f"another one ({problem}): pass --codec-checkpoint with the file the data was prepared with"
    )


def load_codec_from_info(
    info: dict, checkpoint: str | None = None, device: str | torch.device = "cpu", where: str = "the data"
) -> AudioCodec:
    """Rebuild the codec recorded by prep (shards.json / mix.json "codec"); checks the fingerprint."""
    check_codec_info(info, where)
    if info.get("name") not in CODECS:
        raise CodecUnavailable(f"{where} was made with codec {info.get('name')!r}, which this unimoe-audio "
                               f"does not have (codecs: {', '.join(CODECS)}): use the version that made it")
    recorded = info.get("checkpoint")
    if checkpoint is None and recorded and info["name"] in REBUILDS_DEFAULT and not os.path.exists(recorded):
        return _default_in_place_of(info, recorded, device, where)
    codec = load_codec(
        info["name"],
        info.get("bandwidth"),
        checkpoint or recorded,
        device,
        seed=info.get("seed") or 0,
    )
    if info.get("fingerprint") and codec.fingerprint() != info["fingerprint"]:
        raise CodecUnavailable(
            f"codec weights differ from the ones used in prep (fingerprint "
            f"{codec.fingerprint()} != {info['fingerprint']}): pass the same checkpoint/seed"
        )
    return codec
