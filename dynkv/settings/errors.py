"""The one error a user can cause through configuration: a cause line and a fix line, exit 2."""

from __future__ import annotations


class SettingsError(Exception):
    """A bad profile, variable or flag. `cause` says what is wrong, `fix` what to type instead."""

    exit_code = 2

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause}\n  fix: {self.fix}"
