"""The plan's user error, defined apart from the builder so every plan module can raise it."""

from __future__ import annotations

from dynkv.settings.errors import SettingsError


class PlanError(SettingsError):
    """The settings are valid one by one but cannot form a deployment (exit 2, cause + fix)."""
