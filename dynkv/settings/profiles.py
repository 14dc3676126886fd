"""Tier profiles: TOML files that name a tier layout (G1→G2, G1→G2→G3, G1→G3) and its sizes.

A profile has a description, an `experimental` flag, a `[kvbm]` section (fields of `KvbmSettings`)
a `[deployment]` section (fields of `DeploymentSettings`) and a `[vllm]` section of vLLM engine
arguments (docs/engine-args.md). Unknown keys are errors: a typo in a profile must not silently fall
back to a default; `[vllm]` names are checked against vLLM's own parser when the plan is built.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynkv.kvbm.config import KvbmSettings
from dynkv.settings.deployment import DeploymentSettings
from dynkv.settings.engine_args import EngineArgs, parse_profile_table
from dynkv.settings.errors import SettingsError

DEFAULT_PROFILE = "gpu-cpu-disk"
_TOP_LEVEL_KEYS = {"description", "experimental", "kvbm", "deployment", "vllm"}
_SECTIONS: dict[str, type] = {"kvbm": KvbmSettings, "deployment": DeploymentSettings}


def profiles_dir() -> Path:
    """Built-in profiles: `dynkv/_profiles` inside a wheel, the repository's `profiles/` otherwise."""
    packaged = Path(__file__).resolve().parent.parent / "_profiles"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str = ""
    experimental: bool = False
    kvbm: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, Any] = field(default_factory=dict)
    vllm: EngineArgs = field(default_factory=EngineArgs)

    @property
    def tiers(self) -> list[str]:
        """Tier chain the profile configures, derived from its sizes (G1 is always there)."""
        tiers = ["G1"]
        if self.kvbm.get("cpu_cache_gb") or self.kvbm.get("cpu_cache_override_num_blocks"):
            tiers.append("G2")
        if self.kvbm.get("disk_cache_gb") or self.kvbm.get("disk_cache_override_num_blocks"):
            tiers.append("G3")
        return tiers


def available_profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def list_profiles() -> list[Profile]:
    return [load_profile(name) for name in available_profile_names()]


def load_profile(name_or_path: str) -> Profile:
    """A profile by built-in name (`gpu-cpu`) or by path (`./mine.toml`)."""
    path = _locate(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(
            f"profile {path} is not valid TOML: {exc}",
            f"correct the TOML syntax in {path} (see profiles/gpu-cpu-disk.toml for an example)",
        ) from None
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"profile {path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
            f"save {path} as UTF-8 (TOML files must be UTF-8)",
        ) from None
    except OSError as exc:
        raise SettingsError(
            f"profile {path} cannot be read: {exc.strerror}", f"check the permissions of {path}"
        ) from None
    return _parse(path, raw)


def _locate(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    looks_like_path = "/" in name_or_path or name_or_path.endswith(".toml")
    if looks_like_path:
        if os.path.isfile(candidate):  # not Path.is_file: 3.11's raises ENAMETOOLONG
            return candidate
        raise SettingsError(
            f"profile file {name_or_path} does not exist",
            "pass an existing .toml file, or one of: " + ", ".join(available_profile_names()),
        )
    builtin = profiles_dir() / f"{name_or_path}.toml"
    if os.path.isfile(builtin):
        return builtin
    raise SettingsError(
        f"unknown profile {name_or_path!r}; available: " + ", ".join(available_profile_names()),
        f"use --profile {DEFAULT_PROFILE} (or another name above), or a path to a .toml file",
    )


def _parse(path: Path, raw: dict[str, Any]) -> Profile:
    for key in raw:
        if key not in _TOP_LEVEL_KEYS:
            raise SettingsError(
                f"unknown key {key!r} in profile {path}",
                "allowed at the top level: " + ", ".join(sorted(_TOP_LEVEL_KEYS)),
            )
    sections: dict[str, dict[str, Any]] = {}
    for section, model in _SECTIONS.items():
        body = raw.get(section, {})
        if not isinstance(body, dict):
            raise SettingsError(
                f"[{section}] in profile {path} must be a table, not {type(body).__name__}",
                f"write it as a [{section}] section with key = value lines",
            )
        for key in body:
            if key not in model.model_fields:
                raise SettingsError(
                    f"unknown key {key!r} in [{section}] of profile {path}",
                    _suggest(key, list(model.model_fields), f"valid [{section}] keys"),
                )
        sections[section] = dict(body)
    description = raw.get("description", "")
    experimental = raw.get("experimental", False)
    if not isinstance(description, str):
        raise SettingsError(
            f"'description' in profile {path} must be a string", 'write description = "..."'
        )
    if not isinstance(experimental, bool):
        raise SettingsError(
            f"'experimental' in profile {path} must be true or false",
            "write experimental = true or experimental = false",
        )
    return Profile(
        name=path.stem,
        path=path,
        description=description,
        experimental=experimental,
        kvbm=sections["kvbm"],
        deployment=sections["deployment"],
        vllm=parse_profile_table(raw.get("vllm", {}), path),
    )


def _suggest(key: str, valid: list[str], what: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"did you mean {close[0]!r}? ({what}: {', '.join(valid)})"
    return f"{what}: {', '.join(valid)}"
