"""Resolve settings from four layers and remember where each value came from.

Layers, strongest first: CLI flag > environment > profile file > built-in default. The environment
layer is pydantic-settings' own `EnvSettingsSource`, so the launcher reads `DYN_KVBM_*` exactly as
the runtime inside vLLM does (`KvbmSettings()`); flags and profile sections enter as plain dicts.
Validation happens once, on the merged values, and a failure is reported against the layer that
supplied the bad value (`DYN_KVBM_CPU_CACHE_GB='abc'`, `[kvbm] cpu_cache_gb in x.toml`, `--flag`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from dynkv.kvbm.config import ENV_PREFIX as KVBM_PREFIX
from dynkv.kvbm.config import KvbmSettings, format_env_value
from dynkv.settings.deployment import DeploymentSettings
from dynkv.settings.engine_args import EngineArgs
from dynkv.settings.env_source import read_env
from dynkv.settings.errors import SettingsError
from dynkv.settings.profiles import DEFAULT_PROFILE, Profile, load_profile

Source = Literal["flag", "env", "profile", "default"]
PROFILE_ENV = "DYNKV_PROFILE"

# Variables that Dynamo's KVBM reads but dynkv's runtime has no use for: not typos, so no warning.
_FOREIGN_KVBM_VARS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Setting:
    value: Any
    source: Source


@dataclass
class Resolved:
    """The outcome of resolution: validated models plus, per variable name, value and source."""

    profile: Profile
    profile_source: Source
    kvbm: KvbmSettings
    deployment: DeploymentSettings
    settings: dict[str, Setting] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # vLLM engine arguments: the profile's [vllm] tables, then the words after `--`
    engine_args: EngineArgs = field(default_factory=EngineArgs)

    def worker_env(self) -> dict[str, str]:
        """The `DYN_KVBM_*` environment every worker receives (the runtime's only input)."""
        return self.kvbm.to_env()

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "profile_path": str(self.profile.path),
            "settings": {
                name: {"value": _jsonable(s.value), "source": s.source}
                for name, s in self.settings.items()
            },
            "worker_env": self.worker_env(),
            "engine_args": self.engine_args.to_json(),
            "warnings": list(self.warnings),
        }


def resolve(
    *,
    profile: str | None = None,
    kvbm_flags: Mapping[str, Any] | None = None,
    deployment_flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    require_tier: bool = True,
    engine_args: Sequence[str] | None = None,
) -> Resolved:
    """Resolve everything `dynkv` needs. Flags with value None count as not given;
    `engine_args` are the words after `--` (vLLM options, strongest over the profile's)."""
    environ = dict(os.environ if env is None else env)
    profile_name, profile_source = _pick_profile(profile, environ)
    prof = load_profile(profile_name)

    kvbm, kvbm_sources = _resolve_model(KvbmSettings, "kvbm", prof, _given(kvbm_flags), environ)
    deployment, dep_sources = _resolve_model(
        DeploymentSettings, "deployment", prof, _given(deployment_flags), environ
    )
    # a deployment without the connector (DYNKV_KVBM=false) has no tiers to configure
    if require_tier and deployment.kvbm and not (kvbm.has_host_tier or kvbm.has_disk_tier):
        raise SettingsError(
            f"no KVBM tier is configured (profile {prof.name!r} and the environment set neither "
            "DYN_KVBM_CPU_CACHE_GB nor DYN_KVBM_DISK_CACHE_GB, nor their *_OVERRIDE_NUM_BLOCKS)",
            "export DYN_KVBM_CPU_CACHE_GB=4 (host tier), or pick --profile gpu-cpu-disk",
        )

    settings: dict[str, Setting] = {}
    for model, sources in ((kvbm, kvbm_sources), (deployment, dep_sources)):
        for name in type(model).model_fields:
            settings[type(model).env_name(name)] = Setting(getattr(model, name), sources[name])
    settings[PROFILE_ENV] = Setting(prof.name, profile_source)
    return Resolved(
        profile=prof,
        profile_source=profile_source,
        kvbm=kvbm,
        deployment=deployment,
        settings=settings,
        warnings=unknown_kvbm_variables(environ),
        engine_args=prof.vllm.with_command_line(engine_args or ()),
    )


def unknown_kvbm_variables(env: Mapping[str, str]) -> list[str]:
    """One warning per `DYN_KVBM_*` variable that no setting reads, with the closest valid name."""
    known = KvbmSettings.env_names()
    warnings = []
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(KVBM_PREFIX) or upper in known or upper in _FOREIGN_KVBM_VARS:
            continue
        close = difflib.get_close_matches(upper, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{var} is not a dynkv KVBM variable and is ignored{hint}")
    return warnings


def _pick_profile(flag: str | None, env: Mapping[str, str]) -> tuple[str, Source]:
    if flag:
        return flag, "flag"
    for key, value in env.items():
        if key.upper() == PROFILE_ENV and value:
            return value, "env"
    return DEFAULT_PROFILE, "default"


def _given(flags: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (flags or {}).items() if v is not None}


def _resolve_model(
    model: type[BaseSettings],
    section: str,
    prof: Profile,
    flags: dict[str, Any],
    environ: dict[str, str],
) -> tuple[Any, dict[str, Source]]:
    unknown = set(flags) - set(model.model_fields)
    if unknown:  # a programming error in the CLI layer, not a user error
        raise KeyError(f"unknown {section} flags: {sorted(unknown)}")
    layers: list[tuple[Source, dict[str, Any]]] = [
        ("flag", flags),
        ("env", read_env(model, environ)),
        ("profile", getattr(prof, section)),
    ]
    merged: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for name in model.model_fields:
        for label, values in layers:
            if name in values:
                merged[name] = values[name]
                sources[name] = label
                break
        else:
            sources[name] = "default"
    try:
        return model.model_validate(merged), sources
    except ValidationError as exc:
        raise _explain(exc, model, section, prof, sources, merged) from None


def _explain(
    exc: ValidationError,
    model: type[BaseSettings],
    section: str,
    prof: Profile,
    sources: dict[str, Source],
    merged: dict[str, Any],
) -> SettingsError:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    info = model.model_fields.get(name)
    extra = (info.json_schema_extra if info else None) or {}
    expect = extra.get("expect", "a valid value")
    example = extra.get("example", "...")
    source = sources.get(name, "default")
    shown = "***" if name == "api_key" else merged.get(name, "<default>")
    if source == "profile":
        what = f"[{section}] {name} = {shown!r} in {prof.path}"
        fix = f"edit {prof.path}: {name} = {example!r} ({expect}), or remove the line"
        return SettingsError(f"{what} is invalid: expected {expect}", fix)
    elif source == "flag":
        label = "--" + name.replace("_", "-")
        fix = f"pass {label} {example} ({expect})"
    else:
        label = model.env_name(name)
        fix = f"export {label}={example} ({expect}), or unset {label}"
    return SettingsError(f"{label}={shown!r} is invalid: expected {expect}", fix)


def _jsonable(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "***" if value.get_secret_value() else ""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return format_env_value(value)
