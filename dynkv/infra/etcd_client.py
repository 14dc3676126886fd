"""A small etcd v3 client over etcd's JSON gRPC-gateway (`/v3/...`), with httpx.

Why not a gRPC client library: the maintained Python ones pull in grpcio and protobuf versions that
fight vLLM's; the gateway ships inside every etcd ≥ 3.4 and needs only HTTP. In its JSON, keys and
values are base64 and 64-bit integers are strings.

What dynkv needs, and only that: put/get/range by prefix/delete, leases (grant, keep-alive,
revoke, time-to-live) for worker registrations, and a prefix watch for discovery. `EtcdClient`
is synchronous (the worker wrapper, the supervisor); `AsyncEtcdClient` has the same methods as
coroutines and `watch_prefix` as an async generator (the frontend). Both fail over between
endpoints on connection errors, and a watch resumes after a dropped stream from the revision after
the last event it delivered, so a consumer sees every change exactly once (unless etcd compacted
that history: `EtcdCompacted`, then re-list with `get_prefix` and watch from its revision + 1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx

from dynkv.infra.etcd_wire import (  # noqa: F401 (the public names are re-exported)
    DEFAULT_TIMEOUT,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseExpired,
    RangeResult,
    WatchEvent,
    checked_json,
    delete_request,
    endpoint_list,
    parse_keepalive,
    parse_range,
    parse_watch_line,
    prefix_range_end,
    put_request,
    range_request,
    revision_of,
    watch_request,
)
from dynkv.plan.model import redact_urls


class _Failover:
    """The endpoint choice both clients share: the one that answered last first, then the others
    in turn; a watch moves on to the next endpoint until it has failed for `timeout`."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float) -> None:
        self.endpoints = endpoint_list(endpoints)
        self.timeout = timeout
        self._current = 0

    def _rotation(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _watch_lost(self, exc: Exception, failing_since: float | None) -> float:
        """Move the watch to the next endpoint; EtcdUnavailable once it has failed too long."""
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > self.timeout:
            raise EtcdUnavailable(f"etcd watch lost and not resumed: {exc}") from None
        self._current = (self._current + 1) % len(self.endpoints)
        return failing_since


class EtcdClient(_Failover):
    """Synchronous client. Use as a context manager, or call close()."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(endpoints, timeout)
        self._http = httpx.Client(timeout=timeout, trust_env=False)  # loopback: no proxy

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for idx in self._rotation():
            try:
                resp = self._http.post(self.endpoints[idx] + path, json=body)
            except httpx.TransportError as exc:
                errors.append(f"{redact_urls(self.endpoints[idx])}: {exc}")  # logged
                continue
            self._current = idx
            return checked_json(resp)
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def health(self) -> bool:
        """True when some endpoint answers `/health` with {"health": "true"}."""
        for endpoint in self.endpoints:
            try:
                if self._http.get(endpoint + "/health").json().get("health") == "true":
                    return True
            except (httpx.HTTPError, ValueError):
                continue
        return False

    def put(self, key: str, value: Any, *, lease: int = 0) -> int:
        """Store `value` (bytes, str, or anything JSON-serialisable); returns the new revision."""
        return revision_of(self._call(*put_request(key, value, lease)))

    def get(self, key: str) -> KeyValue | None:
        kvs = parse_range(self._call(*range_request(key, False))).kvs
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> RangeResult:
        return parse_range(self._call(*range_request(prefix, True)))

    def delete(self, key: str) -> int:
        return int(self._call(*delete_request(key, False)).get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call(*delete_request(prefix, True)).get("deleted", 0))

    def lease_grant(self, ttl: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Refresh the lease once; returns its new TTL, or raises LeaseExpired."""
        return parse_keepalive(self._call("/v3/lease/keepalive", {"ID": str(lease)}), lease)

    def lease_revoke(self, lease: int) -> None:
        """Revoke the lease (deleting its keys); a lease already gone is not an error."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    def lease_time_to_live(self, lease: int) -> int:
        """Seconds left, or -1 when the lease no longer exists."""
        return int(self._call("/v3/lease/timetolive", {"ID": str(lease)}).get("TTL", -1))

    def watch_prefix(
        self, prefix: str, *, start_revision: int | None = None, idle_timeout: float | None = None
    ) -> Iterator[WatchEvent]:
        """Every change under `prefix`, in order, from `start_revision` (default: from now).

        Blocks between events; with `idle_timeout` the generator ends when no event arrives for
        that long (resume later with start_revision = last event's revision + 1). A dropped
        connection is resumed on the next endpoint; EtcdUnavailable after `timeout` of failures."""
        next_rev = start_revision
        failing_since: float | None = None
        timeout = httpx.Timeout(self.timeout, read=idle_timeout)
        while True:
            endpoint = self.endpoints[self._current]
            try:
                with self._http.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json=watch_request(prefix, next_rev),
                    timeout=timeout,
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        checked_json(resp)
                    failing_since = None
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        for event in parse_watch_line(line):
                            next_rev = event.revision + 1
                            yield event
            except httpx.ReadTimeout:
                return
            except httpx.TransportError as exc:
                failing_since = self._watch_lost(exc, failing_since)
                time.sleep(0.2)


class AsyncEtcdClient(_Failover):
    """The same API as EtcdClient, as coroutines; `watch_prefix` is an async generator that a
    task cancels to stop."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(endpoints, timeout)
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False)  # no proxy

    async def __aenter__(self) -> AsyncEtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for idx in self._rotation():
            try:
                resp = await self._http.post(self.endpoints[idx] + path, json=body)
            except httpx.TransportError as exc:
                errors.append(f"{redact_urls(self.endpoints[idx])}: {exc}")  # logged
                continue
            self._current = idx
            return checked_json(resp)
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    async def put(self, key: str, value: Any, *, lease: int = 0) -> int:
        return revision_of(await self._call(*put_request(key, value, lease)))

    async def get(self, key: str) -> KeyValue | None:
        kvs = parse_range(await self._call(*range_request(key, False))).kvs
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str) -> RangeResult:
        return parse_range(await self._call(*range_request(prefix, True)))

    async def delete(self, key: str) -> int:
        return int((await self._call(*delete_request(key, False))).get("deleted", 0))

    async def delete_prefix(self, prefix: str) -> int:
        return int((await self._call(*delete_request(prefix, True))).get("deleted", 0))

    async def lease_grant(self, ttl: int) -> int:
        return int((await self._call("/v3/lease/grant", {"TTL": str(ttl)}))["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        return parse_keepalive(await self._call("/v3/lease/keepalive", {"ID": str(lease)}), lease)

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def watch_prefix(
        self, prefix: str, *, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix`, in order, until the consuming task stops iterating."""
        import asyncio

        next_rev = start_revision
        failing_since: float | None = None
        timeout = httpx.Timeout(self.timeout, read=None)
        while True:
            endpoint = self.endpoints[self._current]
            try:
                async with self._http.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json=watch_request(prefix, next_rev),
                    timeout=timeout,
                ) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        checked_json(resp)
                    failing_since = None
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        for event in parse_watch_line(line):
                            next_rev = event.revision + 1
                            yield event
            except httpx.TransportError as exc:
                failing_since = self._watch_lost(exc, failing_since)
                await asyncio.sleep(0.2)


class LeaseKeeper:
    """Keeps one lease alive from a daemon thread (every TTL/3), so a registration lives exactly
    as long as its process. When the lease is lost anyway (etcd restarted without its data, a long
    pause), `on_lost` is called once from the thread; the owner decides whether to re-register."""

    def __init__(
        self,
        client: EtcdClient,
        lease: int,
        ttl: int,
        *,
        on_lost: Callable[[Exception], None] | None = None,
    ) -> None:
        self.client, self.lease, self.ttl = client, lease, ttl
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease:x}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.client.timeout + 1)

    def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.5)
        while not self._stop.wait(interval):
            try:
                self.client.lease_keepalive(self.lease)
            except LeaseExpired as exc:
                if self.on_lost and not self._stop.is_set():
                    self.on_lost(exc)
                return
            except EtcdError:
                continue  # etcd briefly unreachable: retry next tick while the TTL lasts
