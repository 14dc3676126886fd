"""The root command group: turns user errors into 'cause + fix' and exit code 2 in one place."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from dynkv.cli.output import failure
from dynkv.settings.errors import SettingsError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A problem the user can fix (not a bug): printed as cause + fix, never as a traceback."""

    def __init__(self, cause: str, fix: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(cause)
        self.cause, self.fix, self.exit_code = cause, fix, exit_code


class DynkvGroup(TyperGroup):
    def invoke(self, ctx: typer.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            failure(exc.cause, exc.fix)
            raise typer.Exit(EXIT_USAGE) from None
        except UserError as exc:
            failure(exc.cause, exc.fix)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
