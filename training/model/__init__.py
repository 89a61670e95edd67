"""The audio-token LM and everything that is the model's own: the input layout (batch), the delay pattern,
tensor parallelism applied from outside (tensor_parallel), upcycling, parameter/FLOP counts, sampling.

    from training.model import AudioLM, ModelConfig
"""

from training.model.lm import IGNORE_INDEX, TASKS, AudioLM, KVCache, ModelConfig

__all__ = ["IGNORE_INDEX", "TASKS", "AudioLM", "KVCache", "ModelConfig"]
