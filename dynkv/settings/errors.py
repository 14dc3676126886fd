"""The one error a user can cause through configuration: a cause line and a fix line, exit 2."""

from __future__ import annotations

from dynkv.errors import CauseFix


class SettingsError(CauseFix):
    """A bad profile, variable or flag. `cause` says what is wrong, `fix` what to type instead."""

    exit_code = 2

    def __str__(self) -> str:
        return f"{self.cause}\n  fix: {self.fix}"
