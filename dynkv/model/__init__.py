"""Local test models: Llama-shaped, random weights, a locally trained tokenizer; no download.

They exist so that dynkv can be run, tested and benchmarked on a machine without network access
to a model hub: the weights are random, so the text they generate is gibberish, but the KV cache
they produce has the size and layout of a real Llama's.
"""

from dynkv.model.generate import (
    DEFAULT_SEED,
    RANDOM_WEIGHTS_NOTE,
    ModelError,
    ModelInfo,
    create_model,
    ensure_model,
    models_root,
)
from dynkv.model.presets import PRESETS, ModelShape, kv_bytes_per_token

__all__ = [
    "DEFAULT_SEED",
    "PRESETS",
    "RANDOM_WEIGHTS_NOTE",
    "ModelError",
    "ModelInfo",
    "ModelShape",
    "create_model",
    "ensure_model",
    "kv_bytes_per_token",
    "models_root",
]
