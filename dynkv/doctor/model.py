"""Where the model comes from (a path, the model cache, the Hugging Face cache, the hub) and
its config, without a network; what one token of its KV costs is `dynkv.model.presets`'s
`kv_bytes_per_token`, the arithmetic every sizing shares."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynkv.plan.model_source import looks_local
from dynkv.xdg import cache_home, dynkv_cache

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hf_home(env: Mapping[str, str]) -> Path:
    """huggingface_hub's HF_HOME: $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/…"""
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser()
    return cache_home(env) / "huggingface"


def hf_hub_cache(env: Mapping[str, str]) -> Path:
    """Where models are cached: $HF_HUB_CACHE (or the legacy HUGGINGFACE_HUB_CACHE), else
    HF_HOME/hub, as huggingface_hub resolves it."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(env[key])).expanduser()
    return hf_home(env) / "hub"


def generated_models_root(env: Mapping[str, str]) -> Path:
    """Where `dynkv model create` keeps generated models ($XDG_CACHE_HOME/dynkv/models)."""
    return dynkv_cache(env) / "models"


@dataclass(frozen=True)
class ModelSource:
    """kind: local (a directory), hf_cache (found offline), remote (an id not cached: vLLM would
    download it), generated (no --model: the tiny test model), broken (a path without config)."""

    kind: str
    spec: str | None
    path: Path | None = None
    config: dict[str, Any] | None = None
    weights_bytes: int | None = None
    problem: str | None = None


def _catalog_entry(spec: str | None) -> Any:
    """The dynkv.model catalogue entry `spec` names (no spec: the CPU default), if installed."""
    try:
        from dynkv.model.catalog import DEFAULT_CPU_MODEL, lookup
    except ImportError:
        return None
    return lookup(spec or DEFAULT_CPU_MODEL)


# os.path.exists/isdir/isfile here, not Path's: on Python 3.11 those raise on a name too long for
# the file system (ENAMETOOLONG), and a mistyped --model must be a finding, never a crashed check.
def locate_model(spec: str | None, env: Mapping[str, str]) -> ModelSource:
    """kind `generated` (dynkv-tiny, dynkv-bench) or `catalog` (fetched on first use, the CPU
    default) for a catalogue name; `path` is set once it is in the model cache."""
    local = bool(spec) and looks_local(spec or "")  # the plan's rule (dynkv.plan.model_source)
    entry = None if local else _catalog_entry(spec)
    if entry is not None:
        from dynkv.model.catalog import shape_config

        kind = "generated" if entry.generated else "catalog"
        path = generated_models_root(env) / (entry.preset or entry.name)
        config = _read_config(path / "config.json") or shape_config(entry)
        if not os.path.isdir(path):
            return ModelSource(kind, spec or entry.name, None, config)
        return ModelSource(kind, spec or entry.name, path, config, weights_size(path))
    if not spec:
        path = generated_models_root(env) / "tiny"
        config = _read_config(path / "config.json")
        if config is None:
            config = _tiny_preset_config()
        if not os.path.isdir(path):
            return ModelSource("generated", None, None, config)
        return ModelSource("generated", None, path, config, weights_size(path))
    path = Path(spec).expanduser()
    if os.path.isdir(path):
        config_path = path / "config.json"
        config = _read_config(config_path)
        if config is None:
            problem = (
                "has no config.json"
                if not os.path.exists(config_path)
                else "has an unreadable config.json"
            )
            return ModelSource("broken", spec, path, problem=problem)
        return ModelSource("local", spec, path, config, weights_size(path))
    if local:
        return ModelSource("broken", spec, path, problem="does not exist or is not a directory")
    snapshot = hf_snapshot(spec, hf_hub_cache(env))
    if snapshot is not None:
        return ModelSource(
            "hf_cache",
            spec,
            snapshot,
            _read_config(snapshot / "config.json"),
            weights_size(snapshot),
        )
    return ModelSource("remote", spec)


def hf_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The cached snapshot of `repo_id` (the `main` ref first) that has a config.json."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not os.path.isdir(snapshots):
        return None
    try:
        main = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    ordered = sorted(snapshots.iterdir(), key=lambda p: (p.name != main, -_mtime(p)))
    for snap in ordered:
        if os.path.isfile(snap / "config.json"):
            return snap
    return None


def weights_size(directory: Path) -> int:
    """Bytes of weight files (symlinks into the HF blob store are followed)."""
    total = 0
    for item in directory.iterdir():
        if item.name.endswith(WEIGHT_SUFFIXES):
            with contextlib.suppress(OSError):
                total += item.stat().st_size
    return total


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tiny_preset_config() -> dict[str, Any] | None:
    """The shape `dynkv model create` will generate, when that module is installed."""
    try:
        from dynkv.model.presets import PRESETS  # type: ignore[import-not-found]

        return PRESETS["tiny"].hf_config(bos_token_id=0, eos_token_id=[1])
    except Exception:
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
