"""The codebook delay pattern: K parallel codebook streams shifted in time so one step predicts all K.

Layout of one delayed sequence of S = T + max(delays) + 2 frames ([K, S], codebook k delayed by d_k):

    frame 0                      BOS in every codebook (the first input frame)
    frames 1 .. d_k              BOS (codebook k has not started yet)
    frames d_k+1 .. d_k+T        the T codes of codebook k
    frame  d_k+T+1               EOS
    frames after that            PAD

Special codes follow Dia/UniMoE-Audio and sit right after the codebook: EOS = codebook_size,
PAD = codebook_size + 1, BOS = codebook_size + 2 (1024/1025/1026 for 1024-entry codebooks).
MusicGen's pattern is delays [0, 1, .., K-1]; the paper's is [0, 8, 9, .., 8+K-2].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_SPECIAL_CODES = 3


def musicgen_delays(num_codebooks: int) -> list[int]:
    return list(range(num_codebooks))


def paper_delays(num_codebooks: int, first: int = 8) -> list[int]:
    """[0, 8, 9, ..]: codebook 0 undelayed, codebook k >= 1 delayed by first + k - 1."""
    return [0] + [first + k for k in range(num_codebooks - 1)]


def resolve_delays(pattern: str | list[int], num_codebooks: int) -> list[int]:
    """`pattern` is "musicgen", "paper", "none" or an explicit list of K non-negative ints."""
    if isinstance(pattern, str):
        table = {"musicgen": musicgen_delays, "paper": paper_delays, "none": lambda k: [0] * k}
        if pattern not in table:
            raise ValueError(f"delay pattern {pattern!r}: use one of {sorted(table)} or a list of ints")
        return table[pattern](num_codebooks)
    delays = [int(d) for d in pattern]
    if len(delays) != num_codebooks or any(d < 0 for d in delays):
        raise ValueError(f"delay pattern {delays}: need {num_codebooks} non-negative delays "
                         "(one per codebook)")
    return delays


@dataclass(frozen=True)
class DelayPattern:
    delays: tuple[int, ...]
    codebook_size: int

    def __post_init__(self):
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError(f"delays must be a non-empty list of non-negative ints, got {self.delays}")

    @classmethod
    def build(cls, pattern: str | list[int], num_codebooks: int, codebook_size: int) -> "DelayPattern":
        return cls(tuple(resolve_delays(pattern, num_codebooks)), codebook_size)

    @property
    def num_codebooks(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def eos(self) -> int:
        return self.codebook_size

    @property
    def pad(self) -> int:
        return self.codebook_size + 1

    @property
    def bos(self) -> int:
        return self.codebook_size + 2

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + NUM_SPECIAL_CODES

    def delayed_length(self, num_frames: int) -> int:
        return num_frames + self.max_delay + 2

    def apply(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [K, T] (or [B, K, T], all of length T) -> delayed [.., K, T + max_delay + 2]."""
        K, T = codes.shape[-2:]
        if K != self.num_codebooks:
            raise ValueError(f"codes have {K} codebooks but the delay pattern has {self.num_codebooks}")
        if T > 0 and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        out = codes.new_full((*codes.shape[:-1], self.delayed_length(T)), self.pad)
        for k, d in enumerate(self.delays):
            out[..., k, : d + 1] = self.bos
            out[..., k, d + 1: d + 1 + T] = codes[..., k, :]
            out[..., k, d + 1 + T] = self.eos
        return out

    def undo(self, delayed: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """delayed [.., K, S] -> codes [.., K, T].

        T is `num_frames` if given, else read from the sequence: S - max_delay - 2 for a complete
        sequence, or fewer when codebook 0 has an EOS earlier (its first EOS ends the frames).
        Frames a codebook did not reach yet (a truncated sequence) are returned as PAD.
        """
        S = delayed.shape[-1]
        if num_frames is None:
            num_frames = max(S - self.max_delay - 2, 0)
            if delayed.dim() == 2:
                eos = (delayed[0] == self.eos).nonzero()
                if len(eos):
                    num_frames = int(eos[0, 0]) - self.delays[0] - 1
        out = delayed.new_full((*delayed.shape[:-2], self.num_codebooks, num_frames), self.pad)
        for k, d in enumerate(self.delays):
            chunk = delayed[..., k, d + 1: d + 1 + num_frames]
            out[..., k, : chunk.shape[-1]] = chunk
        return out

    def frame_is_special(self, num_frames: int) -> torch.Tensor:
        """bool [K, S]: True where the delayed layout of a T-frame sequence holds BOS or PAD
        (positions whose targets carry no information and are left out of the loss)."""
        S = self.delayed_length(num_frames)
        t = torch.arange(S)
        d = torch.tensor(self.delays)[:, None]
        return (t[None, :] <= d) | (t[None, :] > d + num_frames + 1)
