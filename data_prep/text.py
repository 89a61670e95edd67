"""Text tokenizer: sentencepiece (BPE) over all transcripts and captions, with the model's special ids.

    pad = 0, unk = 1, no bos/eos, user-defined symbols <speech> = 2, <music> = 3, <sep> = 4.

The model's collate builds  [task token] text ids [<sep>] audio frames  from these constants.
`unimoe data tokenizer --manifest M... --vocab-size V --out spm.model`. A vocabulary larger than the
corpus can fill is clamped to the largest reachable size, and the command says so. A corpus with more
distinct characters than the vocabulary can hold (Chinese text with a small vocabulary) is trained with
sentencepiece's byte fallback: the most frequent characters get pieces (`character_coverage` < 1) and the
rare ones are spelled as their UTF-8 bytes (256 byte pieces), so every text still encodes and decodes.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import unicodedata
from collections import Counter

import numpy as np
import sentencepiece as spm

from data_prep.manifest import read_manifest

TEXT_PAD_ID = 0
UNK_ID = 1
TASK_TOKEN_IDS = {"speech": 2, "music": 3}
SEP_ID = 4
SPECIAL_SYMBOLS = ["<speech>", "<music>", "<sep>"]  # ids 2, 3, 4 in this order
MIN_VOCAB = 16
BYTE_PIECES = 256
_TOO_MANY_CHARS = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class Tokenizer:
    """A loaded sentencepiece model; encode(text) -> int32 ids (no task token, no separator)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer not found: {path} (make one with `unimoe data tokenizer`)")
        self.path = os.path.abspath(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        for sym, want in zip(SPECIAL_SYMBOLS, (2, 3, SEP_ID)):
            if self.sp.piece_to_id(sym) != want:
                raise ValueError(
                    f"{path}: {sym} has id {self.sp.piece_to_id(sym)}, expected {want}; "
                    "train the tokenizer with `unimoe data tokenizer`"
                )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        # special symbols typed inside a transcript are not allowed to become control ids
        for sym in SPECIAL_SYMBOLS:
            text = text.replace(sym, sym[1:-1])
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def _train(texts: list[str], vocab_size: int, byte_fallback: bool = False) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=TEXT_PAD_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=SPECIAL_SYMBOLS,
        character_coverage=1.0,
        byte_fallback=byte_fallback,
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()


def _keep_frequent(texts: list[str], max_chars: int) -> list[str]:
    """The texts with every character outside the `max_chars` most frequent (after NFKC, as sentencepiece
    normalises) replaced by a space: the tokenizer is trained on these, rare characters become bytes."""
    texts = [unicodedata.normalize("NFKC", t) for t in texts]
    counts = Counter(ch for t in texts for ch in t if not ch.isspace())
    keep = {ch for ch, _ in counts.most_common(max_chars)}
    return ["".join(ch if ch in keep or ch.isspace() else " " for ch in t) for t in texts]


def _train_byte_fallback(texts: list[str], vocab_size: int, log) -> bytes:
    distinct = len({ch for t in texts for ch in t if not ch.isspace()})
    room = vocab_size - BYTE_PIECES - len(SPECIAL_SYMBOLS) - 2  # byte pieces, <pad>, <unk>, user symbols
    if room < MIN_VOCAB:
        raise ValueError(
            f"the corpus has {distinct} distinct characters, more than --vocab-size {vocab_size} can hold, "
            "and too few for the byte fallback: use --vocab-size >= "
            f"{BYTE_PIECES + len(SPECIAL_SYMBOLS) + 2 + 64}"
        )
    max_chars = room * 3 // 4  # leave a quarter of the room for merged pieces
    while True:
        try:
            proto = _train(_keep_frequent(texts, max_chars), vocab_size, byte_fallback=True)
            break
        except RuntimeError as e:
            if not _TOO_MANY_CHARS.search(str(e)) or max_chars <= MIN_VOCAB:
                raise
            max_chars //= 2
    log(
        f"[tokenizer] {distinct} distinct characters do not fit --vocab-size {vocab_size}: the {max_chars} "
        "most frequent get pieces, the others are spelled as their UTF-8 bytes (byte fallback)"
    )
    return proto


def train_tokenizer(texts: list[str], out: str, vocab_size: int = 1000, log=print) -> dict:
    """Train and write `out` (spm.model). Returns {"path", "vocab_size", "requested_vocab_size"}."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to train the tokenizer on (all transcripts/captions empty?)")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size must be >= {MIN_VOCAB}, got {vocab_size}")
    used, byte_fallback = vocab_size, False
    try:
        proto = _train(texts, vocab_size)
    except RuntimeError as e:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if _TOO_MANY_CHARS.search(str(e)):
            proto, byte_fallback = _train_byte_fallback(texts, vocab_size, log), True
        elif not m:
            raise
        else:
            used = int(m.group(2))
            log(
                f"[tokenizer] vocab size {vocab_size} is more than this corpus of {len(texts)} texts can "
                f"fill; using the largest reachable size {used} (add text or lower --vocab-size to silence "
                "this)"
            )
            proto = _train(texts, used)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, out)
    tok = Tokenizer(out)
    info = {
        "path": tok.path,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "texts": len(texts),
        "byte_fallback": byte_fallback,
        "special": {"pad": TEXT_PAD_ID, "unk": UNK_ID, **TASK_TOKEN_IDS, "sep": SEP_ID},
    }
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def run_cli(args) -> int:
    texts, rejected = [], 0
    for path in args.manifest:
        try:
            items, rejects, _ = read_manifest(path)
        except OSError as e:
            print(f"error: cannot read manifest {path}: {e}", file=sys.stderr)
            return 2
        texts += [it.text for it in items]
        rejected += len(rejects)
    if rejected:
        print(
            f"[tokenizer] skipped {rejected} invalid manifest lines "
            "(`unimoe data prep` lists them with reasons)",
            file=sys.stderr,
        )
    try:
        info = train_tokenizer(texts, args.out, args.vocab_size, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[tokenizer] wrote {info['path']} (vocab {info['vocab_size']}, {info['texts']} texts)")
    return 0
