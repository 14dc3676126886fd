"""Errors the runtime raises for conditions a user fixes by configuration (cause + fix)."""

from __future__ import annotations


class KvbmConfigError(Exception):
    """A tier cannot start as configured; `fix` names the variable or command that helps."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause} (fix: {fix})")
        self.cause = cause
        self.fix = fix
