"""Check data_prep.dac_model against the descript-audio-codec package's own DAC module (the key map and the
numbers), without installing the package or its dependencies (audiotools, torchaudio):

    pip download --no-deps descript-audio-codec==1.0.0 -d /tmp/dac && unzip -q /tmp/dac/*.whl -d /tmp/dac/src
    python scripts/check_dac_reference.py /tmp/dac/src            # prints one JSON object, exit 1 on mismatch

It builds the package's `dac.DAC(**16 kHz kwargs)` with its own random init (audiotools replaced by a
stand-in module: DAC only needs nn.Module from it), saves it in the release's format ({"state_dict",
"metadata": {"kwargs"}}, as audiotools' BaseModel.save(package=False) writes weights_16khz.pth), loads that
file with data_prep.dac_codec (weights_only=True), and compares the state-dict keys and shapes, the codes
of a 1.3 s signal and the decoded audio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

import torch


class _Stub(types.ModuleType):
    """A stand-in for a module DAC's model code does not use at run time: any attribute is a dummy class
    (or a pass-through decorator for argbind.bind)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "bind":
            return lambda *a, **k: (lambda f: f)
        return type(name, (), {})


def _stub_audiotools() -> None:
    """audiotools (which imports torchaudio) and argbind replaced; audiotools.ml.BaseModel is nn.Module."""
    ml = _Stub("audiotools.ml")
    ml.BaseModel = type("BaseModel", (torch.nn.Module,), {"INTERN": [], "EXTERN": []})
    audiotools = _Stub("audiotools")
    audiotools.ml = ml
    sys.modules.update({"audiotools": audiotools, "audiotools.ml": ml, "argbind": _Stub("argbind")})


def main(src: str) -> int:
    _stub_audiotools()
    sys.path.insert(0, src)
    from dac.model.dac import DAC as PackageDAC  # the package's module, from its wheel's source

    from data_prep.dac_codec import load_dac_checkpoint
    from data_prep.dac_model import DAC_16KHZ

    torch.manual_seed(0)
    ref = PackageDAC(**{**DAC_16KHZ.kwargs(), "quantizer_dropout": 0.5}).eval()
    with torch.no_grad():  # the package's init gives zero biases and untouched alpha: perturb everything
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights_16khz.pth")
        torch.save({"state_dict": ref.state_dict(), "metadata": {"kwargs": dict(ref.metadata["kwargs"])
                    if hasattr(ref, "metadata") else {**DAC_16KHZ.kwargs(), "quantizer_dropout": 0.5}}}, path)
        ours = load_dac_checkpoint(path).eval()
    ref_keys = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    wav = 0.3 * torch.sin(torch.arange(20800) / 16000 * 2 * torch.pi * 220).view(1, 1, -1)
    wav = wav + 0.05 * torch.randn(wav.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, ref_codes, *_ = ref.encode(ref.preprocess(wav, 16000))
        our_codes = ours.encode(wav)
        ref_audio = ref.decode(ref.quantizer.from_codes(ref_codes)[0])
        our_audio = ours.decode(ref_codes)
    result = {
        "package_params": sum(p.numel() for p in ref.parameters()),
        "ours_params": sum(p.numel() for p in ours.parameters()),
        "keys_equal": ref_keys == our_keys,
        "num_keys": len(ref_keys),
        "keys_only_in_package": sorted(set(ref_keys) - set(our_keys))[:5],
        "keys_only_in_ours": sorted(set(our_keys) - set(ref_keys))[:5],
        "codes_shape": list(our_codes.shape),
        "codes_equal": bool(torch.equal(ref_codes, our_codes)),
        "decode_max_abs_diff": float((ref_audio - our_audio).abs().max()),
        "decode_bit_identical": bool(torch.equal(ref_audio, our_audio)),
    }
    print(json.dumps(result))
    ok = result["keys_equal"] and result["codes_equal"] and result["decode_max_abs_diff"] < 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
