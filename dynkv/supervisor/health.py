"""Readiness probes: is a service answering the way a healthy one does?

None of etcd, NATS or vLLM signals readiness on its own (Dynamo's compose file has no health
checks either), so `up` polls: etcd `GET /health` → {"health": "true"}, NATS `GET /healthz` →
{"status": "ok"}, vLLM `GET /health` → 200, and a worker counts as up only once its key is in
etcd. A probe never raises: it returns (ok, detail) and the detail ends up in the progress display
or in the error when the wait times out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import httpx

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.plan.model import (
    EtcdHealthProbe,
    EtcdKeyProbe,
    HttpProbe,
    NatsProbe,
    Probe,
    TcpProbe,
    probe_from_json,
)

DEFAULT_TIMEOUT = 1.0

__all__ = ["DEFAULT_TIMEOUT", "check", "check_all", "nats_info", "probe_from_json"]


def check(probe: Probe, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    try:
        match probe:
            case HttpProbe():
                return _http(probe, timeout)
            case TcpProbe():
                with socket.create_connection((probe.host, probe.port), timeout=timeout):
                    return True, "accepting connections"
            case NatsProbe():
                return nats_info(probe.host, probe.port, timeout)
            case EtcdHealthProbe():
                with EtcdClient(probe.endpoints, timeout=timeout, tls=probe.tls) as client:
                    ok = client.health()
                return ok, "healthy" if ok else "no endpoint reports healthy"
            case EtcdKeyProbe():
                with EtcdClient(probe.endpoints, timeout=timeout, tls=probe.tls) as client:
                    kv = client.get(probe.key)
                return (kv is not None), ("registered" if kv else f"{probe.key} not registered yet")
    except (OSError, httpx.HTTPError, EtcdError) as exc:  # ssl.SSLError is an OSError
        return False, f"{probe.describe()}: {exc}"
    return False, f"unknown probe {probe!r}"


def check_all(probes: Iterable[Probe], timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """All probes pass; otherwise the detail of the first that does not."""
    for probe in probes:
        ok, detail = check(probe, timeout)
        if not ok:
            return False, detail
    return True, "healthy"


def _http(probe: HttpProbe, timeout: float) -> tuple[bool, str]:
    # trust_env=False: a control endpoint on loopback is never reached through HTTP_PROXY;
    # an advertised deployment's services are verified against its CA (docs/multi-host.md)
    verify = True if probe.tls is None else probe.tls.ssl_context()
    resp = httpx.get(probe.url, timeout=timeout, trust_env=False, verify=verify)
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
