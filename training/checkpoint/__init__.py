"""Checkpoints: DeepSpeed's own files are the one copy of the training state.

    manifest.py     tags, the COMPLETE manifest (files + sizes), find / verify
    save.py         the collective save: room check, every rank writes + fsyncs, agreement, COMPLETE
    deepspeed_io.py DeepSpeed's checkpoint engine with fsync and a record of the files written
    client.py       our per-rank client state (weights_only) and the RNG states
    retention.py    keep_last + keep_every
    resume.py       resume at the saved layout (DeepSpeed) or from a reshard (by name, own share only)
    zero_files.py   DeepSpeed's ZeRO-1/2 files by parameter name (param_slice_mappings)
    reader.py       one interface over checkpoints, reshards and exports: tensors by name, lazily
    reshard.py      `unimoe ckpt reshard` (TP / EP / DP), offline
    export.py       `unimoe ckpt export` (a bundle directory: bundle.py)
    bundle.py       the exported directory: tokenizer and codec inside, relative paths
    weights.py      weights for inference and for stage starts
    inference.py    a model with its codec and tokenizer for `generate` / `eval`
    tokenizers.py   the tokenizer sha256 checks (stage starts, eval)
    torch_files.py, safetensors_io.py   reading .pt without code, streaming .safetensors writes
"""
