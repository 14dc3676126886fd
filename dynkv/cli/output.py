"""Where output goes: people read rich text on stderr, machines read `--json` alone on stdout."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Rich honours NO_COLOR and non-terminals by itself; stderr keeps stdout clean for --json.
err = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def failure(cause: str, fix: str | None = None) -> None:
    """The house style for a problem: one line of cause, one line of fix."""
    err.print(f"[bold red]error:[/bold red] {escape(cause)}", soft_wrap=True)
    if fix:
        err.print(f"  [bold]fix:[/bold] {escape(fix)}", soft_wrap=True)


def numbers_table(title: str, columns: Iterable[str], *, text: Collection[str] = ()) -> Table:
    """A table of measurements: the first column (and those named in `text`) are labels, left
    aligned; every other column holds numbers, right aligned so their digits line up."""
    table = Table(title=title, expand=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 or col in text else "right")
    return table
