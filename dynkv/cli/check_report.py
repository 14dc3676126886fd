"""The one way check results are shown: `dynkv doctor` prints every row, `dynkv up` (its
preflight) only the warnings and failures, both as ✓ / ! / ✗, the id, the detail, and the fix on
its own line under a problem."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text

from dynkv.cli.output import err
from dynkv.doctor import CheckResult, Status

SYMBOLS = {Status.OK: ("✓", "green"), Status.WARN: ("!", "yellow"), Status.FAIL: ("✗", "bold red")}


def render_rows(results: Iterable[CheckResult]) -> None:
    """One line per check (symbol, id, detail) and the fix on its own line under a problem, all
    soft-wrapped: a hard wrap would break a port number, a path or a command at the terminal's
    edge, and a fix must survive copy and paste."""
    results = list(results)
    id_width = max((len(r.id) for r in results), default=8)
    indent = " " * (1 + 2 + id_width + 2)
    for r in results:
        symbol, style = SYMBOLS[r.status]
        line = Text.assemble((symbol, style), "  ", (r.id.ljust(id_width), "bold"), "  ", r.detail)
        err.print(line, soft_wrap=True)
        if r.fix:
            err.print(Text(f"{indent}fix: {r.fix}", style=style), soft_wrap=True)


def render_report(results: list[CheckResult]) -> None:
    """`dynkv doctor`: every row, then the summary."""
    render_rows(results)
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    summary = (
        f"{counts[Status.OK]} ok, {counts[Status.WARN]} warning(s), "
        f"{counts[Status.FAIL]} failure(s)"
    )
    if counts[Status.FAIL]:
        err.print(f"[bold red]✗ doctor: {summary}[/bold red]: `dynkv up` would stop here")
    elif counts[Status.WARN]:
        err.print(f"[yellow]! doctor: {summary}[/yellow]: `dynkv up` can start")
    else:
        err.print(f"[green]✓ doctor: {summary}[/green]")


def render_problems(results: Iterable[CheckResult]) -> None:
    """`dynkv up`: the warnings and failures only, in the doctor's rows."""
    render_rows(r for r in results if r.status is not Status.OK)
