"""pydantic-settings' own environment parsing, pointed at a mapping instead of `os.environ`.

Every typed settings model of dynkv (deployment and KVBM settings, the frontend's, the worker
wrapper's) reads its variables this way, so a caller can pass the environment it means (tests, a
child's environment) and the parsing rules (prefixes, aliases, comma lists, empty values) are
pydantic-settings' for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource


class MappingEnvSource(EnvSettingsSource):
    def __init__(self, model: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(model)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            k.lower(): v
            for k, v in self._environ.items()
            if not (self.env_ignore_empty and v == "")
        }


def read_env(model: type[BaseSettings], environ: Mapping[str, str]) -> dict[str, Any]:
    """The values `model` finds in `environ`, keyed as pydantic-settings keys them."""
    return MappingEnvSource(model, environ)()
