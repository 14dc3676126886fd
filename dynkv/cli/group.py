"""The root command group: turns user errors into 'cause + fix' and exit code 2 in one place."""

from __future__ import annotations

import typer

# typer carries its own copy of click; its usage errors are these classes, not the click package's
from typer._click.exceptions import BadParameter, NoSuchOption, UsageError
from typer.core import TyperGroup

from dynkv.cli.output import failure
from dynkv.errors import CauseFix
from dynkv.settings.errors import SettingsError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(CauseFix):
    """A problem the user can fix (not a bug): printed as cause + fix, never as a traceback."""

    def __init__(self, cause: str, fix: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(cause, fix)
        self.exit_code = exit_code


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
        except UsageError as exc:  # an option's own bound or choice, an unknown option
            failure(*usage_cause_and_fix(exc))
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


def usage_cause_and_fix(exc: UsageError) -> tuple[str, str]:
    """Typer's message as the cause; as the fix, the option's bounds, or for an unknown option
    the sibling command that has it, else the command's --help."""
    ctx = exc.ctx
    where = f"`{ctx.command_path} --help`" if ctx is not None else "--help"
    cause = exc.format_message().rstrip(".")
    if isinstance(exc, NoSuchOption) and ctx is not None and ctx.parent is not None:
        for name, cmd in getattr(ctx.parent.command, "commands", {}).items():
            opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
            if cmd is not ctx.command and exc.option_name in opts:
                home = f"{ctx.parent.command_path} {name}"
                return cause, f"{exc.option_name} is an option of `{home}` (see `{home} --help`)"
    param = getattr(exc, "param", None)
    if isinstance(exc, BadParameter) and param is not None:
        flag = (getattr(param, "opts", None) or [param.name])[0]
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        if low is not None and high is not None:
            return cause, f"pass {flag} between {low} and {high}"
        if low is not None:
            return cause, f"pass {flag} {low} or more"
        if high is not None:
            return cause, f"pass {flag} {high} or less"
    return cause, f"see {where}"
