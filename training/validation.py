"""Validation during training (data.valid every logging.eval_every steps): batches, the collective
evaluation and the last/best results that go into the checkpoint's meta.

The loss code is unimoe eval's (training.eval.evaluate.LossSums): token-weighted cross-entropy per task and
codebook; each data-parallel rank sums its share of the batches, one all-reduce adds them.
"""

from __future__ import annotations

from training.config import ConfigError


def validation_batches(cfg, train_reader, model_cfg, pg):
    """DistributedBatches over the validation mix (fixed-size batches split over the data-parallel ranks as
    in training, no conditioning dropout; smaller than the training batch when the mix holds fewer samples),
    or None without validation (logging.eval_every 0)."""
    from training.data import DistributedBatches, open_reader, resolve_valid_mix
    path = resolve_valid_mix(cfg.data) if cfg.logging.eval_every else None
    if path is None:
        return None
    reader = open_reader(cfg.data, path)
    for key in ("name", "sample_rate", "num_codebooks", "codebook_size"):
        if reader.codec_info.get(key) != train_reader.codec_info.get(key):
            raise ConfigError(f"data.valid: {path} holds codec {key}={reader.codec_info.get(key)}, the "
                              f"training data {train_reader.codec_info.get(key)}: prepare both alike")
    sha = reader.mix.get("tokenizer_sha256"), train_reader.mix.get("tokenizer_sha256")
    if None not in sha and sha[0] != sha[1]:
        raise ConfigError(f"data.valid: {path} was tokenized with another tokenizer than the training data "
                          f"(sha256 {sha[0][:12]} vs {sha[1][:12]}); prepare both with one tokenizer")
    micro = cfg.micro_batch_size(pg.dp)
    unit = pg.dp * micro  # a validation batch: the training batch, or fewer micro-batches for a small mix
    batch = min(cfg.data.global_batch_size, max(unit, len(reader) // unit * unit))
    return DistributedBatches(reader, model_cfg, batch, micro, pg.dp_rank, pg.dp, cond_drop_prob=0.0,
                              seed=cfg.data.seed)


def run_validation(engine, valid_data, max_batches: int, pg) -> dict:
    """Collective (every rank): the validation loss per task and codebook on the first max_batches global
    batches of the validation mix (no more than it holds, at least one), each data-parallel rank its share,
    summed over the data-parallel group. The training data position and every RNG stream are left as
    they were (the RNG states are saved and restored around it), so training continues unchanged."""
    import torch

    from training.checkpoint.client import rng_state, set_rng_state
    from training.cluster.parallel import all_reduce_values
    from training.eval.evaluate import validation_loss
    n = max(1, min(max_batches, len(valid_data.reader) // valid_data.global_batch))
    device = engine.device

    def batches():
        for i in range(n):
            for mb in valid_data.batches_at(i * valid_data.global_batch):
                yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()}

    saved = rng_state()
    engine.module.eval()
    try:
        return validation_loss(engine.module, engine, batches(),
                               lambda values: all_reduce_values(values, group=pg.dp_group))
    finally:
        engine.module.train()
        set_rng_state(saved)


def update_valid_state(state: dict, step: int, result: dict) -> dict:
    """{"last", "best"}: the newest validation result and the one with the lowest loss (for the meta)."""
    last = {"step": step, "loss": result["loss"], "loss_per_task": result["loss_per_task"]}
    best = state.get("best")
    return {"last": last, "best": last if best is None or last["loss"] <= best["loss"] else best}


def evaluation_due(step: int, last: int, every: int) -> bool:
    """Every `every` steps and at the last step; never when every is 0."""
    return bool(every) and (step % every == 0 or step == last)
