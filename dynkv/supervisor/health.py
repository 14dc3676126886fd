"""Readiness probes: is a service answering the way a healthy one does?

None of etcd, NATS or vLLM signals readiness on its own (Dynamo's compose file has no health
checks either), so `up` polls: etcd `GET /health` → {"health": "true"}, NATS `GET /healthz` →
{"status": "ok"}, vLLM `GET /health` → 200, and a worker counts as up only once its key is in
etcd. A probe never raises: it returns (ok, detail) and the detail ends up in the progress display
or in the error when the wait times out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.plan.model import Probe

DEFAULT_TIMEOUT = 1.0


def probe_from_json(data: Mapping[str, Any]) -> Probe:
    """A probe read back from state.json."""
    fields = dict(data)
    if "endpoints" in fields:
        fields["endpoints"] = tuple(fields["endpoints"])
    return Probe(**fields)


def check(probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    try:
        if probe.kind == "http":
            return _http(probe, timeout)
        if probe.kind == "tcp":
            with socket.create_connection((probe.host, probe.port), timeout=timeout):
                return True, "accepting connections"
        if probe.kind == "nats":
            return nats_info(probe.host or "127.0.0.1", probe.port or 4222, timeout)
        if probe.kind == "etcd_health":
            with EtcdClient(probe.endpoints, timeout=timeout) as client:
                ok = client.health()
            return ok, "healthy" if ok else "no endpoint reports healthy"
        if probe.kind == "etcd_key":
            with EtcdClient(probe.endpoints, timeout=timeout) as client:
                kv = client.get(probe.key or "")
            return (kv is not None), ("registered" if kv else f"{probe.key} not registered yet")
    except (OSError, httpx.HTTPError, EtcdError) as exc:
        return False, f"{probe.describe()}: {exc}"
    return False, f"unknown probe kind {probe.kind!r}"


def check_all(probes: Iterable[Probe], timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """All probes pass; otherwise the detail of the first that does not."""
    for probe in probes:
        ok, detail = check(probe, timeout)
        if not ok:
            return False, detail
    return True, "healthy"


def _http(probe: Probe, timeout: float) -> tuple[bool, str]:
    resp = httpx.get(probe.url or "", timeout=timeout)
    if resp.status_code != probe.expect_status:
        return False, f"{probe.describe()}: HTTP {resp.status_code}"
    if probe.expect_json:
        try:
            body = resp.json()
        except ValueError:
            return False, f"{probe.describe()}: not JSON"
        for key, want in probe.expect_json.items():
            if not isinstance(body, dict) or body.get(key) != want:
                return False, f"{probe.describe()}: {key}={body.get(key)!r}, want {want!r}"
    return True, "healthy"


def nats_info(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """A NATS server greets every client with `INFO {...}`; anything else is not NATS."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if data.startswith(b"INFO "):
        return True, "NATS greeted with INFO"
    return False, f"nats {host}:{port}: no INFO greeting (got {data[:40]!r})"
