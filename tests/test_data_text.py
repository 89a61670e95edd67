"""The tokenizer on a large character set: 3,000 CJK characters with a 1,000-piece vocabulary.

Run: .venv/bin/pytest tests/test_data_text.py
"""

import re
import unicodedata

import numpy as np
import pytest

from data_prep.text import Tokenizer, train_tokenizer
from training.cli import main as cli

CJK = [chr(0x4E00 + i) for i in range(3000)]


def _texts(n=1500):
    rng = np.random.default_rng(0)
    return ["".join(rng.choice(CJK, 20)) + " 你好 hello" for _ in range(n)]


def test_large_character_set_trains_with_byte_fallback(tmp_path):
    logs = []
    info = train_tokenizer(_texts(), str(tmp_path / "zh.model"), 1000, log=logs.append)
    assert info["vocab_size"] == 1000 and info["byte_fallback"] is True
    assert re.search(r"\[tokenizer\] 3\d\d\d distinct characters do not fit --vocab-size 1000: the \d+ most "
                     r"frequent get pieces.*\(byte fallback\)", logs[0])
    tok = Tokenizer(str(tmp_path / "zh.model"))
    text = CJK[2999] + CJK[1] + "，新的句子 with unseen ☃"
    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFKC", text)  # sentencepiece's normalisation (，-> ,)
    assert int(ids.max()) < 1000
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<speech>", "<music>", "<sep>"]
    assert 1 not in ids.tolist()  # nothing became <unk>


def test_too_small_for_the_fallback_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\d{4} distinct characters, more than --vocab-size 200 can hold.*"
                                         r"--vocab-size >= 325"):
        train_tokenizer(_texts(300), str(tmp_path / "s.model"), 200)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "{i}", "task": "speech", "audio": "a.wav", "text": "{t}"}}\n'
                                for i, t in enumerate(_texts(300))), encoding="utf-8")
    assert cli(["data", "tokenizer", "--manifest", str(manifest), "--vocab-size", "200",
                "--out", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: the corpus has \d{4} distinct characters", err[0])
