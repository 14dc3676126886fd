"""Ending the router's background tasks for sure.

A task that awaits nats-py can outlive one `cancel()`: its first connection retries for ever
when reconnecting is unbounded, and on Python 3.11 a cancellation that lands as a refused
connection completes, or as a reply arrives inside `asyncio.wait_for`, is lost there, so the
task carries on. A close that cancelled once and awaited the task then never returned (the
frontend's shutdown with NATS unreachable); `cancel_and_wait` cancels until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

POLL_SECS = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel `tasks` until every one has ended. Their own errors are retrieved, not raised;
    a cancellation of the caller is not swallowed (asyncio.wait passes it on)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=POLL_SECS)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: an error it ended with is not logged as never read
