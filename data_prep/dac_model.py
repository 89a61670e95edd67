"""The DAC 16 kHz generator (Descript Audio Codec, Kumar et al. 2023) in plain torch, loadable from the
released `weights_16khz.pth` without the `descript-audio-codec` package (which pulls descript-audiotools,
torchaudio and a protobuf downgrade).

    model = DAC(DAC_16KHZ)                      # the architecture, uninitialised (see load/init below)
    z = model.encoder(wav)                      # [B, 1, S] -> [B, 1024, S / 320]
    codes = model.quantizer.encode(z)           # -> [B, 12, T] in [0, 1024)
    wav = model.decoder(model.quantizer.decode(codes))

Module names equal the package's (dac/model/dac.py, dac/nn/layers.py, dac/nn/quantize.py of
descript-audio-codec 1.0.0), so the released state dict loads key for key: the key map is the identity,
    encoder.block.0.{weight_g,weight_v,bias}                   first conv (1 -> 64, k 7)
    encoder.block.{1..4}.block.{0,1,2}.block.{0,2}.alpha       Snake of the residual units (dil 1, 3, 9)
    encoder.block.{1..4}.block.{0,1,2}.block.{1,3}.weight_*    their convs (k 7 dilated, k 1)
    encoder.block.{1..4}.block.{3.alpha, 4.weight_*}           Snake + strided conv (k 2s, stride s)
    encoder.block.{5.alpha, 6.weight_*}                        Snake + last conv (1024 -> 1024, k 3)
    quantizer.quantizers.{0..11}.{in_proj,out_proj}.weight_*   factorized codes (1024 <-> 8, k 1)
    quantizer.quantizers.{0..11}.codebook.weight               [1024, 8]
    decoder.model.0.weight_*                                   first conv (1024 -> 1536, k 7)
    decoder.model.{1..4}.block.{0.alpha, 1.weight_*}           Snake + transposed conv (k 2s, stride s)
    decoder.model.{1..4}.block.{2,3,4}.block.*                 residual units as in the encoder
    decoder.model.{5.alpha, 6.weight_*}                        Snake + last conv (96 -> 1, k 7), then tanh
where weight_* = weight_g ([out, 1, 1]; [in, 1, 1] for transposed convs: torch's weight_norm, dim 0) and
weight_v. A state dict saved by torch's newer parametrized weight_norm (`parametrizations.weight.original0`
/ `original1`) is renamed to weight_g / weight_v (`normalize_keys`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DACConfig:
    """The package's DAC(**kwargs); DAC_16KHZ is conf/final/16khz.yml (= the release's metadata kwargs)."""

    sample_rate: int = 16000
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 5, 8)
    latent_dim: int = 1024  # encoder_dim * 2 ** len(encoder_rates)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 5, 4, 2)
    n_codebooks: int = 12
    codebook_size: int = 1024
    codebook_dim: int = 8

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    def kwargs(self) -> dict:
        """The release's metadata["kwargs"] for this architecture (what the package's DAC.load reads)."""
        out = asdict(self)
        out["encoder_rates"], out["decoder_rates"] = list(self.encoder_rates), list(self.decoder_rates)
        return out


DAC_16KHZ = DACConfig()


class WNConv(nn.Module):
    """A weight-normed Conv1d / ConvTranspose1d (weight = g * v / |v|, norm over all dims but 0), with the
    parameter names of torch.nn.utils.weight_norm: weight_g, weight_v, bias."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, transpose: bool = False):
        super().__init__()
        shape = (cin, cout, kernel_size) if transpose else (cout, cin, kernel_size)
        self.weight_v = nn.Parameter(torch.empty(shape))
        self.weight_g = nn.Parameter(torch.empty(shape[0], 1, 1))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride, self.padding, self.dilation, self.transpose = stride, padding, dilation, transpose

    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)  # what torch's weight_norm hook computes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(Snake1d(dim), WNConv(dim, dim, 7, dilation=dilation, padding=3 * dilation),
                                   Snake1d(dim), WNConv(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        pad = (x.shape[-1] - y.shape[-1]) // 2
        return (x[..., pad:-pad] if pad > 0 else x) + y


def _residual_units(dim: int) -> list[nn.Module]:
    return [ResidualUnit(dim, dilation) for dilation in (1, 3, 9)]


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        down = WNConv(dim // 2, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2))
        self.block = nn.Sequential(*_residual_units(dim // 2), Snake1d(dim // 2), down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(cin),
            WNConv(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2), transpose=True),
            *_residual_units(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: DACConfig):
        super().__init__()
        dim = cfg.encoder_dim
        layers = [WNConv(1, dim, 7, padding=3)]
        for stride in cfg.encoder_rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers += [Snake1d(dim), WNConv(dim, cfg.latent_dim, 3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DACConfig):
        super().__init__()
        layers = [WNConv(cfg.latent_dim, cfg.decoder_dim, 7, padding=3)]
        for i, stride in enumerate(cfg.decoder_rates):
            layers.append(DecoderBlock(cfg.decoder_dim // 2**i, cfg.decoder_dim // 2 ** (i + 1), stride))
        last = cfg.decoder_dim // 2 ** len(cfg.decoder_rates)
        layers += [Snake1d(last), WNConv(last, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class VectorQuantize(nn.Module):
    """Factorized (project to codebook_dim), l2-normalized nearest-code lookup, as the package's."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = WNConv(input_dim, codebook_dim, 1)
        self.out_proj = WNConv(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (codes [B, T], its quantized contribution out_proj(codebook[codes]) [B, D, T])."""
        z_e = self.in_proj(z)
        enc = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
        book = F.normalize(self.codebook.weight)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1)[1].view(z.shape[0], -1)
        z_q = self.codebook(codes).transpose(1, 2)
        return codes, self.out_proj(z_e + (z_q - z_e))  # the package's straight-through sum, bit for bit

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVectorQuantize(nn.Module):
    def __init__(self, cfg: DACConfig):
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantize(cfg.latent_dim, cfg.codebook_size, cfg.codebook_dim)
                                        for _ in range(cfg.n_codebooks))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> codes [B, K, T]: codebook k quantizes what codebooks < k left."""
        residual, codes = z, []
        for quantizer in self.quantizers:
            codes_k, z_q = quantizer.encode(residual)
            residual = residual - z_q
            codes.append(codes_k)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> z [B, D, T], the sum of every codebook's contribution."""
        return sum(q.decode(codes[:, k]) for k, q in enumerate(self.quantizers))


class DAC(nn.Module):
    def __init__(self, cfg: DACConfig = DAC_16KHZ):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVectorQuantize(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, S] -> codes [B, K, ceil(S / hop)] (right-padded to whole hops, as the package's)."""
        pad = -wav.shape[-1] % self.cfg.hop_length
        return self.quantizer.encode(self.encoder(F.pad(wav, (0, pad))))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> wav [B, 1, T * hop]."""
        return self.decoder(self.quantizer.decode(codes))


_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g",
                 "parametrizations.weight.original1": "weight_v"}


def normalize_keys(state: dict) -> dict:
    """A state dict of the package's DAC, with torch's newer parametrized weight-norm names renamed."""
    out = {}
    for key, value in state.items():
        for old, new in _PARAMETRIZED.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def config_from_kwargs(kwargs: dict) -> DACConfig:
    """DACConfig from a release's metadata["kwargs"]; unknown keys (quantizer_dropout: training only) ignored,
    latent_dim None means the package's default (encoder_dim * 2 ** len(encoder_rates))."""
    fields = DACConfig.__dataclass_fields__
    kw = {k: v for k, v in kwargs.items() if k in fields and v is not None}
    for k in ("encoder_rates", "decoder_rates"):
        if k in kw:
            kw[k] = tuple(int(r) for r in kw[k])
    if "latent_dim" not in kw:
        rates = kw.get("encoder_rates", DAC_16KHZ.encoder_rates)
        kw["latent_dim"] = kw.get("encoder_dim", DAC_16KHZ.encoder_dim) * 2 ** len(rates)
    return DACConfig(**kw)
