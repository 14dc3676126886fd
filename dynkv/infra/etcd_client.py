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

import base64
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

DEFAULT_TIMEOUT = 5.0


class EtcdError(Exception):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached."""


class EtcdCompacted(EtcdError):
    """A watch asked for history etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available: {compact_revision})")
        self.compact_revision = compact_revision


class LeaseExpired(EtcdError):
    """The lease is gone (expired or revoked): keys attached to it were deleted."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int = 0
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store revision the read saw; watch from revision + 1 to miss nothing


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    key: str
    value: bytes  # empty for DELETE
    revision: int  # mod_revision of the change
    kv: KeyValue


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_range_end(prefix: str | bytes) -> bytes:
    """The exclusive end of the range of keys starting with `prefix` (etcd's GetPrefixRangeEnd)."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(raw.get("key")).decode("utf-8", "replace"),
        value=_unb64(raw.get("value")),
        lease=int(raw.get("lease", 0)),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        version=int(raw.get("version", 0)),
    )


def _revision(resp: dict[str, Any]) -> int:
    return int(resp.get("header", {}).get("revision", 0))


def _encode(value: str | bytes | Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


# Request bodies and response parsers, shared by the sync and async clients.


def _put(key: str, value: Any, lease: int) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(_encode(value))}
    if lease:
        body["lease"] = str(lease)
    return "/v3/kv/put", body


def _range(key: str, prefix: bool) -> tuple[str, dict[str, Any]]:
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(prefix_range_end(key))
    return "/v3/kv/range", body


def _parse_range(resp: dict[str, Any]) -> RangeResult:
    return RangeResult([_kv(kv) for kv in resp.get("kvs", [])], _revision(resp))


def _delete(key: str, prefix: bool) -> tuple[str, dict[str, Any]]:
    path, body = _range(key, prefix)
    return "/v3/kv/deleterange", body


def _parse_keepalive(resp: dict[str, Any], lease: int) -> int:
    result = resp.get("result", resp)
    if "error" in resp:
        raise EtcdError(str(resp["error"]))
    ttl = int(result.get("TTL", 0))
    if ttl <= 0:
        raise LeaseExpired(f"lease {lease:x} has expired or was revoked")
    return ttl


def _watch_body(prefix: str, start_revision: int | None) -> dict[str, Any]:
    create: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
    if start_revision:
        create["start_revision"] = str(start_revision)
    return {"create_request": create}


def _parse_watch_line(line: str) -> list[WatchEvent]:
    """One line of the watch stream → its events; raises on cancel/compaction/error."""
    msg = json.loads(line)
    if "error" in msg:
        raise EtcdError(f"watch failed: {msg['error']}")
    result = msg.get("result", {})
    if result.get("compact_revision") and int(result["compact_revision"]) > 0:
        raise EtcdCompacted(int(result["compact_revision"]))
    if result.get("canceled"):
        raise EtcdError(f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
    events = []
    for ev in result.get("events", []):
        kv = _kv(ev.get("kv", {}))
        kind = "DELETE" if ev.get("type") == "DELETE" else "PUT"
        events.append(WatchEvent(kind, kv.key, kv.value, kv.mod_revision, kv))
    return events


def _raise_for(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code >= 400:
        message = data.get("message") or data.get("error") or resp.text[:200]
        raise EtcdError(f"etcd {resp.request.url.path}: HTTP {resp.status_code}: {message}")
    return data


def _endpoints(endpoints: str | Sequence[str]) -> list[str]:
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip().rstrip("/") for e in items if e.strip()]
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class EtcdClient:
    """Synchronous client. Use as a context manager, or call close()."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT):
        self.endpoints = _endpoints(endpoints)
        self.timeout = timeout
        self._http = httpx.Client(timeout=timeout, trust_env=False)  # no HTTP_PROXY
        self._current = 0

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            idx = (self._current + i) % len(self.endpoints)
            try:
                resp = self._http.post(self.endpoints[idx] + path, json=body)
            except httpx.TransportError as exc:
                errors.append(f"{self.endpoints[idx]}: {exc}")
                continue
            self._current = idx
            return _raise_for(resp)
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
        return _revision(self._call(*_put(key, value, lease)))

    def get(self, key: str) -> KeyValue | None:
        kvs = _parse_range(self._call(*_range(key, False))).kvs
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> RangeResult:
        return _parse_range(self._call(*_range(prefix, True)))

    def delete(self, key: str) -> int:
        return int(self._call(*_delete(key, False)).get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call(*_delete(prefix, True)).get("deleted", 0))

    def lease_grant(self, ttl: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Refresh the lease once; returns its new TTL, or raises LeaseExpired."""
        return _parse_keepalive(self._call("/v3/lease/keepalive", {"ID": str(lease)}), lease)

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
                    json=_watch_body(prefix, next_rev),
                    timeout=timeout,
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _raise_for(resp)
                    failing_since = None
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        for event in _parse_watch_line(line):
                            next_rev = event.revision + 1
                            yield event
            except httpx.ReadTimeout:
                return
            except httpx.TransportError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.timeout:
                    raise EtcdUnavailable(f"etcd watch lost and not resumed: {exc}") from None
                self._current = (self._current + 1) % len(self.endpoints)
                time.sleep(0.2)


class AsyncEtcdClient:
    """The same API as EtcdClient, as coroutines; `watch_prefix` is an async generator that a
    task cancels to stop."""

    def __init__(self, endpoints: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT):
        self.endpoints = _endpoints(endpoints)
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False)  # no HTTP_PROXY
        self._current = 0

    async def __aenter__(self) -> AsyncEtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            idx = (self._current + i) % len(self.endpoints)
            try:
                resp = await self._http.post(self.endpoints[idx] + path, json=body)
            except httpx.TransportError as exc:
                errors.append(f"{self.endpoints[idx]}: {exc}")
                continue
            self._current = idx
            return _raise_for(resp)
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    async def put(self, key: str, value: Any, *, lease: int = 0) -> int:
        return _revision(await self._call(*_put(key, value, lease)))

    async def get(self, key: str) -> KeyValue | None:
        kvs = _parse_range(await self._call(*_range(key, False))).kvs
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str) -> RangeResult:
        return _parse_range(await self._call(*_range(prefix, True)))

    async def delete(self, key: str) -> int:
        return int((await self._call(*_delete(key, False))).get("deleted", 0))

    async def delete_prefix(self, prefix: str) -> int:
        return int((await self._call(*_delete(prefix, True))).get("deleted", 0))

    async def lease_grant(self, ttl: int) -> int:
        return int((await self._call("/v3/lease/grant", {"TTL": str(ttl)}))["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        return _parse_keepalive(await self._call("/v3/lease/keepalive", {"ID": str(lease)}), lease)

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
                    json=_watch_body(prefix, next_rev),
                    timeout=timeout,
                ) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        _raise_for(resp)
                    failing_since = None
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        for event in _parse_watch_line(line):
                            next_rev = event.revision + 1
                            yield event
            except httpx.TransportError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.timeout:
                    raise EtcdUnavailable(f"etcd watch lost and not resumed: {exc}") from None
                self._current = (self._current + 1) % len(self.endpoints)
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
