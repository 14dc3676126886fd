"""Which model a worker serves, and under which name: the user's, a catalogue name, or on a CPU
host without one, SmolLM2-135M-Instruct (fetched on first use; docs/models.md).

Kept apart from the pure plan builder because it touches the filesystem: a local model path is
made absolute (services run with the deployment dir as cwd), and a catalogue model may be fetched
or generated. `dynkv-tiny` (random weights) stays available by name for fast tests: it exercises
the whole stack and the KV cache, but its text is noise, so `up` says so.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynkv.settings.errors import SettingsError

TINY_PRESET = "tiny"
TINY_SERVED_NAME = "dynkv-tiny"
DEFAULT_CPU_MODEL = "smollm2-135m-instruct"  # dynkv.model.catalog.DEFAULT_CPU_MODEL
MARKER = "dynkv-model.json"  # written by dynkv.model into every model it generates or fetches
_SERVED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,199}$")
_HF_SNAPSHOT_RE = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


@dataclass(frozen=True)
class ModelChoice:
    model: str  # what vLLM's --model receives: an absolute directory or a Hugging Face id
    served_name: str  # what clients put in "model"
    random_weights: bool = False


def placeholder(name: str) -> str:
    """What a dry run names instead of a catalogue model it does not fetch or generate."""
    return f"<{name}: from the model cache, fetched or generated on first use>"


def looks_local(model: str) -> bool:
    """A model directory rather than a Hugging Face id (`org/name`, one slash at most): an
    absolute, relative or home path, a name with two slashes or more, or one that exists here."""
    # os.path.exists, not Path.exists: Python 3.11's raises on a name too long (ENAMETOOLONG)
    return (
        model.startswith(("/", "./", "../", "~"))
        or model.count("/") > 1
        or os.path.exists(Path(model).expanduser())
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sane(name: object) -> str | None:
    if isinstance(name, str) and _SERVED_RE.match(name) and not looks_local(name):
        return name
    return None


def served_name_for(model: str) -> str:
    """A Hugging Face id serves under its id. A directory under the model's own name: the name
    dynkv recorded when it fetched or generated it, else the hub id its config was saved from,
    else the hub id of a Hugging Face cache snapshot, and only then its last path component."""
    if not looks_local(model):
        return model
    path = Path(model).expanduser().resolve()
    if name := _sane(_read_json(path / MARKER).get("name")):
        return name
    config = _read_json(path / "config.json")
    for key in ("_name_or_path", "_model_name_or_path"):
        if (name := _sane(config.get(key))) and "/" in name:  # an org/name hub id
            return name
    if path.parent.name == "snapshots" and (m := _HF_SNAPSHOT_RE.match(path.parent.parent.name)):
        return f"{m['org']}/{m['name']}"
    return path.name or model


def choose_model(
    model: str | None,
    device: str,
    *,
    generate: bool = True,
    served_name: str | None = None,
    progress: Any = None,
) -> ModelChoice:
    """`generate=False` (dry runs) names a catalogue model without fetching or writing it.
    `served_name` (--served-model-name) overrides the name clients use; `progress` receives the
    phases of a first fetch (a dynkv.model.fetch.FetchProgress)."""
    if served_name is not None and not _SERVED_RE.match(served_name):
        raise SettingsError(
            f"invalid served model name {served_name!r}",
            "use letters, digits and . _ - / : @ +, starting with a letter or digit",
        )
    if model and looks_local(model):
        path = Path(model).expanduser().resolve()
        if not os.path.isdir(path):  # not Path.is_dir: 3.11's raises ENAMETOOLONG
            raise SettingsError(
                f"model directory {path} does not exist",
                "pass --model with an existing model directory or a Hugging Face id",
            )
        return ModelChoice(str(path), served_name or served_name_for(str(path)))
    if not model and device != "cpu":
        raise SettingsError(
            f"no model given, and {DEFAULT_CPU_MODEL} is only the default on CPU (device {device})",
            "pass --model Qwen/Qwen3-0.6B (a Hugging Face id or a model directory), or export DYNKV_MODEL",
        )
    name = model or DEFAULT_CPU_MODEL
    try:
        from dynkv.model.catalog import lookup
    except ImportError:  # a launcher-only install without the model package
        lookup = None  # type: ignore[assignment]
    entry = lookup(name) if lookup else None
    if entry is None:
        if not model:
            raise SettingsError(
                "no model given, and the model catalogue is not available",
                "pass --model <model directory or Hugging Face id>",
            )
        return ModelChoice(model, served_name or model)
    served = served_name or entry.name
    if not generate:
        return ModelChoice(placeholder(entry.name), served, entry.generated)
    from dynkv.model.fetch import fetch_model

    path = fetch_model(entry, progress=progress).path
    return ModelChoice(str(path.resolve()), served, entry.generated)
