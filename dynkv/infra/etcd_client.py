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

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import httpx

from dynkv.infra import etcd_wire as wire
from dynkv.infra.etcd_wire import (  # noqa: F401 (the public names are re-exported)
    DEFAULT_TIMEOUT,
    Call,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseExpired,
    RangeResult,
    WatchEvent,
    checked_json,
    endpoint_list,
    parse_watch_line,
    prefix_range_end,
    watch_request,
)
from dynkv.plan.model import redact_urls
from dynkv.tls.model import ClientTLS

T = TypeVar("T")
RECONNECT_S = 0.2  # pause before a lost watch tries the next endpoint
_UNREACHABLE = "every endpoint failed: _attempts raised EtcdUnavailable"


class _Attempt:
    """One endpoint's try at a call: a transport error is recorded and suppressed (the next
    endpoint is tried); any answer, even an error, makes this endpoint the current one."""

    def __init__(self, failover: _Failover, index: int, errors: list[str]) -> None:
        self.failover, self.index, self.errors = failover, index, errors
        self.url = failover.endpoints[index]

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb) -> bool:
        if isinstance(exc, httpx.TransportError):
            self.errors.append(f"{redact_urls(self.url)}: {exc}")  # logged
            return True
        self.failover._current = self.index
        return False


def _verify(tls: ClientTLS | None) -> Any:
    """httpx's `verify`: an advertised deployment's CA and client certificate (etcd runs with
    --client-cert-auth, docs/multi-host.md); httpx's default otherwise (plain http on loopback)."""
    return True if tls is None else tls.ssl_context()


class _Failover:
    """What both clients share: their httpx client (`_HTTP`, sync or async), and the endpoint
    choice: the one that answered last first, then the others in turn; a watch moves on to the
    next endpoint until it has failed for `timeout`."""

    _HTTP: Any  # httpx.Client or httpx.AsyncClient

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: ClientTLS | None = None,
    ) -> None:
        self.endpoints = endpoint_list(endpoints)
        self.timeout = timeout
        self._current = 0
        # loopback: no proxy
        self._http = self._HTTP(timeout=timeout, trust_env=False, verify=_verify(tls))

    def _attempts(self) -> Iterator[_Attempt]:
        """An attempt per endpoint, current first; EtcdUnavailable when all of them failed."""
        errors: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            yield _Attempt(self, (self._current + i) % n, errors)
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _watch_lost(self, exc: Exception, failing_since: float | None) -> float:
        """Move the watch to the next endpoint; EtcdUnavailable once it has failed too long."""
        now = time.monotonic()
        failing_since = failing_since or now
        if now - failing_since > self.timeout:
            raise EtcdUnavailable(f"etcd watch lost and not resumed: {exc}") from None
        self._current = (self._current + 1) % len(self.endpoints)
        return failing_since


class _Watch:
    """What a prefix watch keeps across reconnections, for both clients: the revision to resume
    from (the one after the last event delivered) and since when it has been failing."""

    def __init__(self, failover: _Failover, prefix: str, start_revision: int | None) -> None:
        self.failover, self.prefix = failover, prefix
        self.next_rev = start_revision
        self.failing_since: float | None = None

    def request(self) -> tuple[str, dict[str, Any]]:
        url = self.failover.endpoints[self.failover._current] + "/v3/watch"
        return url, watch_request(self.prefix, self.next_rev)

    def opened(self, resp: httpx.Response) -> None:
        """The stream answered (its body read when it is an error, which raises here)."""
        if resp.status_code >= 400:
            checked_json(resp)
        self.failing_since = None

    def events(self, line: str) -> Iterator[WatchEvent]:
        for event in parse_watch_line(line) if line.strip() else ():
            self.next_rev = event.revision + 1
            yield event

    def lost(self, exc: Exception) -> None:
        self.failing_since = self.failover._watch_lost(exc, self.failing_since)


class EtcdClient(_Failover):
    """Synchronous client. Use as a context manager, or call close(). `tls`: https endpoints of
    an advertised deployment, verified against its CA, with a client certificate."""

    _HTTP = httpx.Client

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: Call[T]) -> T:
        for attempt in self._attempts():
            with attempt:
                return call.result(self._http.post(attempt.url + call.path, json=call.body))
        raise AssertionError(_UNREACHABLE)

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
        return self._call(wire.put(key, value, lease))

    def get(self, key: str) -> KeyValue | None:
        return self._call(wire.get(key))

    def get_prefix(self, prefix: str) -> RangeResult:
        return self._call(wire.get_prefix(prefix))

    def delete(self, key: str) -> int:
        return self._call(wire.delete(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._call(wire.delete(prefix, prefix=True))

    def lease_grant(self, ttl: int) -> int:
        return self._call(wire.lease_grant(ttl))

    def lease_keepalive(self, lease: int) -> int:
        """Refresh the lease once; returns its new TTL, or raises LeaseExpired."""
        return self._call(wire.lease_keepalive(lease))

    def lease_revoke(self, lease: int) -> None:
        """Revoke the lease (deleting its keys); a lease already gone is not an error."""
        self._call(wire.lease_revoke(lease))

    def lease_time_to_live(self, lease: int) -> int:
        """Seconds left, or -1 when the lease no longer exists."""
        return self._call(wire.lease_time_to_live(lease))

    def watch_prefix(
        self, prefix: str, *, start_revision: int | None = None, idle_timeout: float | None = None
    ) -> Iterator[WatchEvent]:
        """Every change under `prefix`, in order, from `start_revision` (default: from now).

        Blocks between events; with `idle_timeout` the generator ends when no event arrives for
        that long (resume later with start_revision = last event's revision + 1). A dropped
        connection is resumed on the next endpoint; EtcdUnavailable after `timeout` of failures."""
        watch = _Watch(self, prefix, start_revision)
        timeout = httpx.Timeout(self.timeout, read=idle_timeout)
        while True:
            url, body = watch.request()
            try:
                with self._http.stream("POST", url, json=body, timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                    watch.opened(resp)
                    for line in resp.iter_lines():
                        yield from watch.events(line)
            except httpx.ReadTimeout:
                return
            except httpx.TransportError as exc:
                watch.lost(exc)
                time.sleep(RECONNECT_S)


class AsyncEtcdClient(_Failover):
    """The same API as EtcdClient, as coroutines; `watch_prefix` is an async generator that a
    task cancels to stop."""

    _HTTP = httpx.AsyncClient

    async def __aenter__(self) -> AsyncEtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: Call[T]) -> T:
        for attempt in self._attempts():
            with attempt:
                return call.result(await self._http.post(attempt.url + call.path, json=call.body))
        raise AssertionError(_UNREACHABLE)

    async def put(self, key: str, value: Any, *, lease: int = 0) -> int:
        return await self._call(wire.put(key, value, lease))

    async def get(self, key: str) -> KeyValue | None:
        return await self._call(wire.get(key))

    async def get_prefix(self, prefix: str) -> RangeResult:
        return await self._call(wire.get_prefix(prefix))

    async def delete(self, key: str) -> int:
        return await self._call(wire.delete(key))

    async def delete_prefix(self, prefix: str) -> int:
        return await self._call(wire.delete(prefix, prefix=True))

    async def lease_grant(self, ttl: int) -> int:
        return await self._call(wire.lease_grant(ttl))

    async def lease_keepalive(self, lease: int) -> int:
        return await self._call(wire.lease_keepalive(lease))

    async def lease_revoke(self, lease: int) -> None:
        await self._call(wire.lease_revoke(lease))

    async def lease_time_to_live(self, lease: int) -> int:
        return await self._call(wire.lease_time_to_live(lease))

    async def watch_prefix(
        self, prefix: str, *, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix`, in order, until the consuming task stops iterating."""
        watch = _Watch(self, prefix, start_revision)
        timeout = httpx.Timeout(self.timeout, read=None)
        while True:
            url, body = watch.request()
            try:
                async with self._http.stream("POST", url, json=body, timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                    watch.opened(resp)
                    async for line in resp.aiter_lines():
                        for event in watch.events(line):
                            yield event
            except httpx.TransportError as exc:
                watch.lost(exc)
                await asyncio.sleep(RECONNECT_S)


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
