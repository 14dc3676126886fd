"""Building blocks of settings read from prefixed environment variables (`DYN_KVBM_*`, `DYNKV_*`).

They live in the runtime library, which imports nothing else from dynkv (vLLM loads it in its own
processes), so that the KVBM settings here and the launcher's deployment settings share one
meaning of a variable's name, of its error text and of each common kind of value.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BOOLEAN = "a boolean: true/false, 1/0, yes/no"


def expect(text: str, example: str) -> dict[str, Any]:
    """Field metadata quoted in error messages: what a valid value is, and one to paste."""
    return {"expect": text, "example": example}


def env_config(prefix: str) -> SettingsConfigDict:
    """Variables `<prefix>X`, case-insensitive, empty means unset; unrelated `<prefix>`-looking
    variables (orchestrators inject some) are ignored rather than breaking a launch."""
    return SettingsConfigDict(
        env_prefix=prefix,
        case_sensitive=False,
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )


class EnvSettings(BaseSettings):
    """Settings whose field `x` is environment variable `<env_prefix>X`."""

    @classmethod
    def env_name(cls, field: str) -> str:
        return str(cls.model_config.get("env_prefix", "")) + field.upper()

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Environment variable → field name, for every field."""
        return {cls.env_name(f): f for f in cls.model_fields}


def flag(default: bool, description: str, example: str) -> Any:
    """A boolean setting (`false`/`0`/`no` are false)."""
    return Field(default, description=description, json_schema_extra=expect(BOOLEAN, example))


def positive(default: float, description: str, what: str, example: str) -> Any:
    """A finite number > 0, e.g. `what="a number of seconds > 0"`."""
    return Field(
        default,
        gt=0,
        allow_inf_nan=False,
        description=description,
        json_schema_extra=expect(what, example),
    )


def seconds(default: float, description: str, example: str) -> Any:
    """A duration in seconds > 0."""
    return positive(default, description, "a number of seconds > 0", example)
