"""The router's NATS side: every worker's KV events into the index, snapshots when needed.

Subscribes to `dynkv.<deployment>.kv.*` (one subject per worker, so each worker's messages arrive
in order) and feeds `IndexSync`. When it asks for a snapshot, a task requests one on the worker's
`.snapshot` subject, collects its chunks from a private inbox and retries with a backoff until it
is applied (a worker that is down answers nothing: its entries stay dropped, which costs misses,
never wrong answers). nats-py reconnects by itself; `connected` says whether the index is being
fed, so a caller can fall back to a load-only policy while it is not (docs/kv-events.md).

In an advertised deployment (docs/multi-host.md) NATS wants TLS from the deployment's CA and a
token: unless given `connect_options`, the subscriber takes them from its process's environment
(`DYNKV_CLIENT_CA`, `DYNKV_NATS_TOKEN`: the plan gives the frontend both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from dynkv.kvbm.events import (
    EventBatch,
    SnapshotChunk,
    events_wildcard,
    parse_message,
    reconnecting,
    snapshot_subject,
    worker_of,
)
from dynkv.router.sync import IndexSync
from dynkv.router.tasks import cancel_and_wait
from dynkv.tls.model import NATS_TOKEN_ENV, ClientTLS

log = logging.getLogger("dynkv.router")


def nats_connect_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """nats.connect's `tls` and `token` for the deployment `environ` describes; {} on loopback."""
    options: dict[str, Any] = {}
    tls = ClientTLS.from_env(environ)
    if tls is not None:
        options["tls"] = tls.ssl_context()
    if environ.get(NATS_TOKEN_ENV):
        options["token"] = environ[NATS_TOKEN_ENV]
    return options


class SnapshotError(Exception):
    """A snapshot answer that cannot be used (the caller asks again)."""


class KvEventSubscriber:
    def __init__(
        self,
        nats_url: str,
        deployment: str,
        sync: IndexSync,
        *,
        snapshot_timeout: float = 2.0,
        retry_secs: float = 0.5,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.connect_options = dict(
            nats_connect_options(os.environ) if connect_options is None else connect_options
        )
        self.deployment = deployment
        self.sync = sync
        self.snapshot_timeout = snapshot_timeout
        self.retry_secs = retry_secs
        self.nc = None
        self.malformed = 0
        self.snapshot_failures = 0
        self._tasks: dict[str, asyncio.Task] = {}
        self._closing = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(
            servers=self.nats_url,
            name="dynkv-router",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **reconnecting(self.retry_secs),
            **self.connect_options,
        )
        await self.nc.subscribe(events_wildcard(self.deployment), cb=self._on_message)
        await self.nc.flush()  # the server has the subscription: nothing published after is missed

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._tasks.values())  # snapshot requests (dynkv/router/tasks.py)
        self._tasks.clear()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    def remove_worker(self, worker: str) -> None:
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
        self.sync.remove_worker(worker)

    # ---- messages --------------------------------------------------------------------------------
    async def _on_message(self, msg) -> None:
        try:
            message = parse_message(msg.data)
        except ValidationError:
            self.malformed += 1
            return
        if message.worker_id != worker_of(msg.subject):
            self.malformed += 1  # a worker speaks only for itself
            return
        if isinstance(message, EventBatch):
            wanted = self.sync.on_batch(message)
        else:
            wanted = self.sync.on_rates(message)
        if wanted:
            self.request_snapshot(message.worker_id)

    def request_snapshot(self, worker: str) -> None:
        task = self._tasks.get(worker)
        if task is None or task.done():
            self._tasks[worker] = asyncio.get_running_loop().create_task(self._resync(worker))

    async def _resync(self, worker: str) -> None:
        delay = self.retry_secs
        while self.sync.needs_snapshot(worker):
            try:
                chunks = await self.fetch_snapshot(worker)
            except Exception as exc:  # no answer in time, NATS reconnecting, a bad chunk
                self.snapshot_failures += 1
                log.debug("router: no KV snapshot from %s (%s); retrying", worker, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if not self.sync.on_snapshot(chunks):
                return

    async def fetch_snapshot(self, worker: str) -> list[SnapshotChunk]:
        """Ask `worker` for its key set and collect every chunk of the answer."""
        nc = self.nc
        if nc is None:
            raise OSError("not connected to NATS")
        inbox = nc.new_inbox()
        parts: dict[int, SnapshotChunk] = {}
        done = asyncio.get_running_loop().create_future()

        async def collect(msg) -> None:
            chunk = SnapshotChunk.model_validate_json(msg.data)
            parts[chunk.part] = chunk
            if len(parts) >= chunk.parts and not done.done():
                done.set_result(None)

        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.flush()
            await nc.publish(snapshot_subject(self.deployment, worker), b"", reply=inbox)
            await asyncio.wait_for(done, self.snapshot_timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        chunks = [parts[i] for i in sorted(parts)]
        ids = {(c.instance_id, c.seq) for c in chunks}
        if len(ids) != 1:
            raise SnapshotError(f"{worker} answered with chunks of different snapshots")
        return chunks

    # ---- connection ------------------------------------------------------------------------------
    async def _on_error(self, exc: Exception) -> None:
        log.debug("router: NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("router: lost NATS; KV events are not received until it is back")

    async def _on_reconnected(self) -> None:
        log.info("router: NATS is back; resynchronising KV events")
