"""The shapes of the generated test models, and the arithmetic every sizing decision needs.

`bench` is the model of docs/benchmarks.md, on which the reference TTFTs were measured: changing it makes
the benchmark targets meaningless. Its 76M parameters count the embedding once, because input and
output embeddings are tied (as in Llama 3.2 1B); that is also what keeps the file small.
`tiny` keeps head_dim 64 (what vLLM's CPU attention kernels are built for) and block-friendly
sizes, and is small enough to generate in a second and load in vLLM in seconds, for tests and the
default CPU `dynkv up`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch's names, and vLLM's --dtype aliases (half, float); fp8 for a KV cache quantised to it
DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "float": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture shape. Field names follow Hugging Face's `LlamaConfig`."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str = "bfloat16"
    tie_word_embeddings: bool = True
    rope_theta: float = 500_000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight tensor by its Hugging Face name, in file order."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        ffn = self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
            shapes[p + "mlp.up_proj.weight"] = (ffn, h)
            shapes[p + "mlp.down_proj.weight"] = (h, ffn)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self)

    def hf_config(self, *, bos_token_id: int, eos_token_id: list[int]) -> dict[str, Any]:
        """config.json. `rope_theta` is written flat: transformers 5 and vLLM 0.32 both read it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": INIT_STD,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "use_cache": True,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        }


# Normal(0, 0.02), as Llama's own initializer: activations stay O(1) through the layers, so
# bf16 greedy decoding is finite and repeatable (the output is gibberish all the same).
INIT_STD = 0.02

PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=2048,
        max_position_embeddings=4096,
    ),
    "bench": ModelShape(
        name="bench",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=3,
        intermediate_size=2048,
        vocab_size=2048,
        max_position_embeddings=8192,
    ),
}


def kv_bytes_per_token(
    config: ModelShape | Mapping[str, Any] | Path | str, dtype: str | None = None
) -> int:
    """K and V, every layer: 2 × layers × kv_heads × head_dim × dtype bytes; an MLA model
    (DeepSeek: `kv_lora_rank`) caches one latent of kv_lora_rank + qk_rope_head_dim per layer.

    Takes a preset, a Hugging Face config mapping, or a model directory / config.json path, so
    the same arithmetic sizes the generated models, any model the user brings (doctor, the tier
    sizes) and the bench. Multimodal configs nest the language model in `text_config`. `dtype`
    overrides the model's (the engine's --dtype; None or "auto" keep the config's). Raises
    KeyError/ValueError when the config lacks what the formula needs.
    """
    if isinstance(config, ModelShape):
        layers, own = config.num_hidden_layers, config.dtype
        per_layer = 2 * config.num_key_value_heads * config.head_dim
    else:
        if isinstance(config, str | Path):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        cfg: Mapping[str, Any] = config.get("text_config") or config
        layers = int(cfg["num_hidden_layers"])
        own = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype")
        if cfg.get("kv_lora_rank"):
            per_layer = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
        else:
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            per_layer = 2 * kv_heads * int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    name = str((own if dtype in (None, "auto") else dtype) or "bfloat16").removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_BYTES)}")
    return layers * per_layer * DTYPE_BYTES[name]
