"""Delay pattern: layout, apply/undo round trip (incl. sequences shorter than K and than the delays)."""

import pytest
import torch

from training.model.delay import DelayPattern, musicgen_delays, paper_delays, resolve_delays


def test_named_patterns():
    assert musicgen_delays(4) == [0, 1, 2, 3]
    assert paper_delays(12) == [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert resolve_delays([0, 2, 1], 3) == [0, 2, 1]
    with pytest.raises(ValueError, match="need 3"):
        resolve_delays([0, 1], 3)
    with pytest.raises(ValueError, match="delay pattern 'bogus'"):
        resolve_delays("bogus", 3)


def test_layout_specials():
    p = DelayPattern.build("musicgen", 3, codebook_size=10)
    assert (p.eos, p.pad, p.bos, p.vocab_size) == (10, 11, 12, 13)
    codes = torch.tensor([[1, 2], [3, 4], [5, 6]])
    d = p.apply(codes)
    assert d.tolist() == [[12, 1, 2, 10, 11, 11],
                          [12, 12, 3, 4, 10, 11],
                          [12, 12, 12, 5, 6, 10]]
    special = p.frame_is_special(2)
    assert special.tolist() == [[(d[k, t] in (11, 12)) for t in range(6)] for k in range(3)]


@pytest.mark.parametrize("pattern", ["musicgen", "paper", "none", [3, 0, 1, 2]])
@pytest.mark.parametrize("T", [0, 1, 2, 3, 5, 20])
def test_round_trip(pattern, T):
    p = DelayPattern.build(pattern, 4, codebook_size=16)
    codes = torch.randint(0, 16, (4, T), generator=torch.Generator().manual_seed(T))
    d = p.apply(codes)
    assert d.shape == (4, T + p.max_delay + 2)
    assert torch.equal(p.undo(d), codes)
    assert torch.equal(p.undo(d, num_frames=T), codes)
    batched = p.apply(codes[None].repeat(2, 1, 1))
    assert torch.equal(p.undo(batched, num_frames=T), codes[None].repeat(2, 1, 1))


def test_undo_stops_at_first_eos_of_codebook0():
    p = DelayPattern.build("paper", 3, codebook_size=16)
    codes = torch.randint(0, 16, (3, 4))
    d = torch.cat([p.apply(codes), torch.full((3, 5), p.pad)], dim=1)  # trailing padding
    assert torch.equal(p.undo(d), codes)


def test_bad_codes():
    p = DelayPattern.build("musicgen", 2, codebook_size=8)
    with pytest.raises(ValueError, match="codes must lie in"):
        p.apply(torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match="3 codebooks"):
        p.apply(torch.zeros(3, 2, dtype=torch.long))
