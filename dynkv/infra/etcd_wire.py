"""etcd v3's JSON gRPC-gateway, as data: the records, the errors, and every call as a `Call` (its
path, its body and the parser of its answer), so that the sync and the async client
(`dynkv.infra.etcd_client`) differ only in how they send. In the gateway's JSON, keys and values
are base64 and 64-bit integers are strings.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import httpx

DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")


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


def revision_of(resp: dict[str, Any]) -> int:
    return int(resp.get("header", {}).get("revision", 0))


def _encode(value: str | bytes | Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


# The calls, as data: a request and what its answer means, shared by the sync and the async client
# (each only sends `Call.path` with `Call.body` and hands the response to `Call.result`).


@dataclass(frozen=True)
class Call(Generic[T]):
    """One gateway request and the parser of its answer. An EtcdError whose message contains
    `tolerate` means the call had nothing to do (a lease already gone): the result is None."""

    path: str
    body: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]
    tolerate: str | None = None

    def result(self, resp: httpx.Response) -> T:
        try:
            return self.parse(checked_json(resp))
        except EtcdError as exc:
            if self.tolerate and self.tolerate in str(exc):
                return None  # type: ignore[return-value]
            raise


def put(key: str, value: Any, lease: int = 0) -> Call[int]:
    """Store `value` (bytes, str, or anything JSON-serialisable) → the new revision."""
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(_encode(value))}
    if lease:
        body["lease"] = str(lease)
    return Call("/v3/kv/put", body, revision_of)


def _range_body(key: str, prefix: bool) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(prefix_range_end(key))
    return body


def parse_range(resp: dict[str, Any]) -> RangeResult:
    return RangeResult([_kv(kv) for kv in resp.get("kvs", [])], revision_of(resp))


def _first(resp: dict[str, Any]) -> KeyValue | None:
    kvs = parse_range(resp).kvs
    return kvs[0] if kvs else None


def get(key: str) -> Call[KeyValue | None]:
    return Call("/v3/kv/range", _range_body(key, False), _first)


def get_prefix(prefix: str) -> Call[RangeResult]:
    return Call("/v3/kv/range", _range_body(prefix, True), parse_range)


def _deleted(resp: dict[str, Any]) -> int:
    return int(resp.get("deleted", 0))


def delete(key: str, prefix: bool = False) -> Call[int]:
    """Delete `key` (or every key under it, with `prefix`) → how many were deleted."""
    return Call("/v3/kv/deleterange", _range_body(key, prefix), _deleted)


def lease_grant(ttl: int) -> Call[int]:
    return Call("/v3/lease/grant", {"TTL": str(ttl)}, lambda resp: int(resp["ID"]))


def lease_keepalive(lease: int) -> Call[int]:
    """Refresh the lease once → its new TTL; LeaseExpired when it is gone."""
    return Call("/v3/lease/keepalive", {"ID": str(lease)}, lambda r: parse_keepalive(r, lease))


def lease_revoke(lease: int) -> Call[None]:
    """Revoke the lease (deleting its keys); a lease already gone is not an error."""
    return Call("/v3/lease/revoke", {"ID": str(lease)}, lambda _resp: None, "not found")


def lease_time_to_live(lease: int) -> Call[int]:
    """Seconds left, or -1 when the lease no longer exists."""
    return Call("/v3/lease/timetolive", {"ID": str(lease)}, lambda r: int(r.get("TTL", -1)))


def parse_keepalive(resp: dict[str, Any], lease: int) -> int:
    result = resp.get("result", resp)
    if "error" in resp:
        raise EtcdError(str(resp["error"]))
    ttl = int(result.get("TTL", 0))
    if ttl <= 0:
        raise LeaseExpired(f"lease {lease:x} has expired or was revoked")
    return ttl


def watch_request(prefix: str, start_revision: int | None) -> dict[str, Any]:
    create: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
    if start_revision:
        create["start_revision"] = str(start_revision)
    return {"create_request": create}


def parse_watch_line(line: str) -> list[WatchEvent]:
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


def checked_json(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code >= 400:
        message = data.get("message") or data.get("error") or resp.text[:200]
        raise EtcdError(f"etcd {resp.request.url.path}: HTTP {resp.status_code}: {message}")
    return data


def endpoint_list(endpoints: str | Sequence[str]) -> list[str]:
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip().rstrip("/") for e in items if e.strip()]
    if not out:
        raise ValueError("no etcd endpoint given")
    return out
