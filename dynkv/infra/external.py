"""External etcd and NATS: endpoints someone else runs. dynkv starts nothing for them; it checks
that they answer before starting the workers (etcd: `/health` on at least one endpoint; NATS: a
TCP connection that greets with its `INFO ` line, which a mere open port would not)."""

from __future__ import annotations

from urllib.parse import urlsplit

from dynkv.plan.model import EtcdHealthProbe, NatsProbe, Probe
from dynkv.settings.errors import SettingsError


def split_endpoints(value: str) -> tuple[str, ...]:
    """`"http://a:2379, http://b:2379"` → both URLs; each must be http(s)://host:port."""
    endpoints = tuple(e.strip().rstrip("/") for e in value.split(",") if e.strip())
    if not endpoints:
        raise SettingsError(
            "DYNKV_ETCD_ENDPOINTS is empty", "pass --etcd-endpoints http://HOST:2379"
        )
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"etcd endpoint {endpoint!r} is not an http(s)://host:port URL",
                "pass --etcd-endpoints http://HOST:2379 (comma-separated for several)",
            )
    return endpoints


def nats_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise SettingsError(
            f"NATS URL {url!r} is not a nats://host:port URL", "pass --nats-url nats://HOST:4222"
        )
    return parts.hostname, parts.port or 4222


def external_probes(etcd_endpoints: tuple[str, ...], nats_url: str) -> tuple[Probe, ...]:
    host, port = nats_host_port(nats_url)
    return (
        EtcdHealthProbe(endpoints=etcd_endpoints),
        NatsProbe(host=host, port=port),
    )
