"""Which model a worker serves: the user's, or on a CPU host without one, the generated tiny model.

Kept apart from the pure plan builder because it touches the filesystem: a local model path is
made absolute (services run with the deployment dir as cwd), and the tiny model may be generated.
The tiny model has random weights: it exercises the whole stack (and the KV cache) but its text
is noise, so `up` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dynkv.settings.errors import SettingsError

TINY_PRESET = "tiny"
TINY_SERVED_NAME = "dynkv-tiny"
TINY_PLACEHOLDER = "<generated tiny model: dynkv.model.ensure_model('tiny')>"


@dataclass(frozen=True)
class ModelChoice:
    model: str  # what vLLM's --model receives: an absolute directory or a Hugging Face id
    served_name: str  # what clients put in "model"
    random_weights: bool = False


def looks_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def served_name_for(model: str) -> str:
    """A Hugging Face id serves under its id; a directory under its last component."""
    if looks_local(model):
        return Path(model).expanduser().resolve().name or model
    return model


def choose_model(model: str | None, device: str, *, generate: bool = True) -> ModelChoice:
    """`generate=False` (dry runs) names the tiny model without writing it."""
    if model:
        if looks_local(model):
            path = Path(model).expanduser().resolve()
            if not path.is_dir():
                raise SettingsError(
                    f"model directory {path} does not exist",
                    "pass --model with an existing model directory or a Hugging Face id",
                )
            return ModelChoice(str(path), served_name_for(model))
        return ModelChoice(model, model)
    if device != "cpu":
        raise SettingsError(
            f"no model given, and the generated tiny model is only a default on CPU (device {device})",
            "pass --model Qwen/Qwen3-0.6B (a Hugging Face id or a model directory), or export DYNKV_MODEL",
        )
    if not generate:
        return ModelChoice(TINY_PLACEHOLDER, TINY_SERVED_NAME, random_weights=True)
    try:
        from dynkv.model import ensure_model  # type: ignore[attr-defined]
    except ImportError as exc:
        raise SettingsError(
            f"no model given, and the tiny model generator is not available ({exc})",
            "pass --model <model directory or Hugging Face id>",
        ) from None
    return ModelChoice(str(Path(ensure_model(TINY_PRESET)).resolve()), TINY_SERVED_NAME, True)
