"""A worker's KVBM numbers for `dynkv status`, read from its Prometheus endpoint.

Parsing and the hit-rate rule are `dynkv.metrics_text`'s, shared with `dynkv bench`: the hit
rates shown are the worker's hits / lookups since it started (its counters); the runtime's own
window gauges are the fallback for a runtime without those counters (docs/kvbm.md#metrics).
Tolerant by design: the runtime may expose only some families (or none yet), so a missing family
is None, never an error.
"""

from __future__ import annotations

from typing import Any

import httpx

from dynkv import metrics_text

RATES = {"host": "kvbm_host_cache_hit_rate", "disk": "kvbm_disk_cache_hit_rate"}
SHOWN = (
    "kvbm_host_blocks_used",
    "kvbm_host_blocks_total",
    "kvbm_disk_blocks_used",
    "kvbm_disk_blocks_total",
    "kvbm_matched_tokens",
    "kvbm_offload_blocks_d2h",
    "kvbm_offload_blocks_h2d",
    "kvbm_offload_blocks_d2d",
    "kvbm_onboard_blocks_h2d",
    "kvbm_onboard_blocks_d2d",
    "kvbm_integrity_failures",
    "kvbm_load_failures",
    "kvbm_disk_journal_failures",
    "kvbm_disk_read_timeouts",
    metrics_text.SAVED,  # the load-or-recompute policy's estimate; absent: not measured
)
KEYS = tuple(n.removeprefix("kvbm_") for n in (*RATES.values(), *SHOWN))


def _number(value: float | None) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def summarize(values: dict[str, float]) -> dict[str, float | int | None]:
    """{"host_cache_hit_rate": 0.5, "matched_tokens": 96, ...} with None for absent families."""
    out: dict[str, float | int | None] = {}
    rates = metrics_text.hit_rates([values])
    for tier, name in RATES.items():
        out[name.removeprefix("kvbm_")] = rates[tier]
    for name in SHOWN:
        out[name.removeprefix("kvbm_")] = _number(values.get(name))
    return out


def parse_kvbm(text: str) -> dict[str, float | int | None]:
    return summarize(metrics_text.parse(text))


def read_kvbm(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """The parsed metrics plus `reachable`, and `error` when the endpoint did not answer."""
    try:
        data: dict[str, Any] = {"reachable": True, **summarize(metrics_text.fetch(url, timeout))}
    except (httpx.HTTPError, ValueError) as exc:
        data = {"reachable": False, "error": f"{url}: {exc}"}
        data.update(dict.fromkeys(KEYS))
    return data
