"""Keeping the pool true: etcd registrations in, and unhealthy workers re-probed.

`Discovery.run` lists `/dynkv/<deployment>/workers/` (`get_prefix`), applies it as the whole
pool, then watches the prefix from the listing's revision + 1, so no change between the two is
missed and none is applied twice. A PUT adds or replaces a worker; a DELETE (clean withdrawal, or
etcd expiring a crashed worker's lease) removes it at once. When anything goes wrong (etcd down,
the watch dropped for longer than the client resumes it by itself, history compacted) it starts
over with a fresh listing after a short backoff; meanwhile the pool keeps what it knew, and the
router's own connection failures keep traffic off dead workers.

`HealthChecker.run` probes every unhealthy worker's `/health` each interval and makes it healthy
again on a 200: the way back after a connection failure that did not end the registration (a
restart behind the same URL, a transient refusal).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import httpx

from dynkv.frontend.pool import WorkerPool
from dynkv.infra.etcd_client import EtcdError, RangeResult, WatchEvent
from dynkv.worker.record import workers_prefix

__all__ = ["Discovery", "EtcdSource", "HealthChecker", "workers_prefix"]

log = logging.getLogger("dynkv.frontend")


class EtcdSource(Protocol):
    """What discovery needs of `dynkv.infra.etcd_client.AsyncEtcdClient` (a fake in tests)."""

    async def get_prefix(self, prefix: str) -> RangeResult: ...

    def watch_prefix(self, prefix: str, *, start_revision: int | None = None): ...


class Discovery:
    def __init__(
        self,
        etcd: EtcdSource,
        prefix: str,
        pool: WorkerPool,
        *,
        backoff: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        self.etcd, self.prefix, self.pool = etcd, prefix, pool
        self.backoff, self.max_backoff = backoff, max_backoff
        self.resyncs = 0  # listings applied (1 after start-up; more after reconnections)

    async def sync(self) -> int:
        """Apply a full listing; returns the revision to watch from."""
        listing = await self.etcd.get_prefix(self.prefix)
        self.pool.replace({kv.key: kv.value for kv in listing.kvs})
        self.resyncs += 1
        return listing.revision + 1

    def apply(self, event: WatchEvent) -> None:
        if event.type == "PUT":
            self.pool.put(event.key, event.value)
        else:
            self.pool.remove(event.key)

    async def run(self) -> None:
        delay = self.backoff
        while True:
            try:
                start = await self.sync()
                if self.resyncs > 1:
                    log.info("discovery: re-listed %d worker(s) from etcd", len(self.pool))
                delay = self.backoff
                async for event in self.etcd.watch_prefix(self.prefix, start_revision=start):
                    self.apply(event)
                log.warning("discovery: the etcd watch ended; listing again")
            except asyncio.CancelledError:
                raise
            except (EtcdError, httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("discovery: etcd %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)


class HealthChecker:
    def __init__(
        self,
        pool: WorkerPool,
        client: httpx.AsyncClient,
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.pool, self.client, self.interval, self.timeout = pool, client, interval, timeout

    async def check_once(self) -> None:
        for worker in self.pool.unhealthy():
            try:
                resp = await self.client.get(worker.url + "/health", timeout=self.timeout)
            except httpx.HTTPError as exc:
                worker.reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if resp.status_code == 200:
                self.pool.mark_healthy(worker)
            else:
                worker.reason = f"/health answered {resp.status_code}"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe bug must not end health checking for good
                log.exception("health check failed")
