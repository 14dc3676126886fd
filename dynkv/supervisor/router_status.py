"""The frontend's router for `dynkv status`: the policy it was started with, its decisions, its
accuracy, each worker's share of the routed requests, the blocks held twice, its index and its
NATS fallbacks, all since the frontend started (docs/observability.md#router).

Read from the frontend's /metrics with `dynkv.router_metrics` (the reader `bench serve
--compare-router` uses); a frontend that exposes no router family, or that cannot be read (down,
or a key this caller lacks), gives no router line: the frontend's own health says the rest.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from dynkv import router_metrics
from dynkv.supervisor.state import ServiceRecord


def _flag(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")), None)


def summarize(reading: router_metrics.RouterReading, policy: str | None) -> dict[str, Any]:
    """The router's numbers as `status --json` shows them (None where not exposed)."""
    predicted, actual, ratio = router_metrics.accuracy(reading)
    load = router_metrics.load(reading)
    return {
        "policy": policy,
        "decisions": router_metrics.policies(reading.decisions),
        "accuracy": ratio,
        "predicted_cached_tokens": predicted,
        "actual_cached_tokens": actual,
        "shares": load.shares(),
        "load_source": load.source,
        "index_blocks": reading.index_blocks,
        "index_bytes": reading.index_bytes,
        "nats_fallbacks": reading.nats_fallbacks,
        # blocks the workers came to hold, and of those another worker held already (in an agg
        # fleet, prefixes computed again: docs/observability.md#router); None: not exposed
        "acquired_blocks": sum(reading.acquired.values()) if reading.acquired else None,
        "duplicated_blocks": sum(reading.duplicated.values()) if reading.acquired else None,
    }


def read_reading(
    rec: ServiceRecord, timeout: float, api_key: str | None = None
) -> router_metrics.RouterReading | None:
    """One reading of the frontend `rec`'s /metrics, or None (no URL, no key where it wants
    one, a certificate that cannot be loaded, unreadable)."""
    url = rec.info.url
    if not url:
        return None
    if rec.info.auth == "bearer" and not api_key:
        return None  # /metrics wants the key; the caller's settings have none
    verify: bool | ssl.SSLContext = True
    cert = _flag(rec.argv, "--tls-cert")
    if url.startswith("https:") and cert:
        try:
            verify = ssl.create_default_context(cafile=cert)
        except (OSError, ssl.SSLError):
            return None
    try:
        return router_metrics.fetch(
            f"{url.rstrip('/')}/metrics", timeout, api_key=api_key, verify=verify
        )
    except (httpx.HTTPError, ValueError):
        return None


def read_router(
    rec: ServiceRecord, timeout: float, api_key: str | None = None
) -> dict[str, Any] | None:
    """The router of the frontend `rec`, or None (no URL, no router families, unreadable)."""
    reading = read_reading(rec, timeout, api_key)
    if reading is None or not reading.exposed:
        return None
    return summarize(reading, _flag(rec.argv, "--router"))
