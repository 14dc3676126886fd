"""The shape of every error a user can cause: a one-line cause and a one-line fix.

Each package raises its own subclass (a bad workload, an unusable CA file, a model that fails its
checksum…) so that callers can tell them apart; the CLI prints any of them the same way
(`dynkv.cli.group`), as `error: <cause>` and `fix: <fix>`, never as a traceback. The KVBM runtime
has its own (`dynkv.kvbm.errors`): it imports nothing else from dynkv.
"""

from __future__ import annotations


class CauseFix(Exception):
    """`cause` says what is wrong, `fix` what to type or change instead."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause, self.fix = cause, fix
