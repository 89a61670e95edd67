"""Codec backends by name (no torch import here: the CLI lists the names without loading any codec).

Each entry is "module:function"; the function is called as
    function(checkpoint=str | None, device=str | torch.device, seed=int, bandwidth=float | None)
and returns a data_prep.codec_base.AudioCodec (raising CodecUnavailable / ValueError with a one-line fix).
Adding a backend = one module with that function + one line here.
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "encodec_24khz": "data_prep.codec:load_encodec",
    "random": "data_prep.codec:load_encodec",
    "demo": "data_prep.demo_codec_cache:load_demo_codec",
    "dac_16khz": "data_prep.dac_codec:load_dac",
    "dac_16khz_random": "data_prep.dac_codec:load_dac",
}
# Backends that rebuild their default weights themselves when load_codec gets no checkpoint (the demo
# codec refits deterministically): load_codec_from_info falls back to that default when the file a
# record names is gone, and the fingerprint check decides whether it is the same codec.
REBUILDS_DEFAULT = {"demo", "dac_16khz"}  # dac_16khz: the release from the package's cache or its download


def codec_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_loader(name: str):
    """The loading function of codec `name`; ValueError names the known codecs."""
    if name not in BACKENDS:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(BACKENDS)}")
    module, func = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), func)
