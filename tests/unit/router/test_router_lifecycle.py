"""A router whose NATS never answers still closes.

nats-py's first connection retries forever when reconnecting is unbounded, and on Python 3.11 a
cancellation that lands while a refused connection completes can be lost inside it: the connect
task then goes on retrying, and a close that awaited it once never returned (a frontend shutting
down while NATS was unreachable hung the same way)."""

from __future__ import annotations

import asyncio
import socket

from dynkv.router.router import KvRouter
from dynkv.router.score import ScorerConfig


def _refused_url() -> str:
    with socket.socket() as s:  # a port nothing listens on: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{s.getsockname()[1]}"


def test_close_returns_while_the_first_connection_is_still_being_retried():
    async def once(url: str, after: float) -> None:
        router = KvRouter(url, "d", ScorerConfig(), retry_secs=0.001)
        await router.start()
        await asyncio.sleep(after)  # somewhere in the retry loop: sleeping, connecting, refused
        assert not router.connected
        closing = asyncio.create_task(router.close())
        # asyncio.wait, not wait_for: 3.11's wait_for returns whatever the awaited call returns
        # after its timeout cancelled it, and a close that swallowed that cancellation passed
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert done, "close() did not return"

    async def many() -> None:
        url = _refused_url()
        for i in range(40):
            await once(url, (i % 10) * 0.003)

    asyncio.run(many())
