"""A worker's KVBM numbers for `dynkv status`, read from its Prometheus endpoint.

Parsed with prometheus_client's text parser and looked up by family name (Dynamo's metric
names; docs/kvbm.md#metrics). Tolerant by design: the runtime may expose only some families (or none yet),
so a missing family is None, never an error. Counters are exposed as `<name>_total`; the parser
reports the family without the suffix, and only the `_total` samples are summed (not `_created`).
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = (
    "kvbm_host_cache_hit_rate",
    "kvbm_disk_cache_hit_rate",
    "kvbm_host_blocks_used",
    "kvbm_host_blocks_total",
    "kvbm_disk_blocks_used",
    "kvbm_disk_blocks_total",
)
COUNTERS = (
    "kvbm_matched_tokens",
    "kvbm_offload_blocks_d2h",
    "kvbm_offload_blocks_h2d",
    "kvbm_offload_blocks_d2d",
    "kvbm_onboard_blocks_h2d",
    "kvbm_onboard_blocks_d2d",
    "kvbm_integrity_failures",
    "kvbm_load_failures",
    "kvbm_disk_journal_failures",
)
_RATES = {"kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate"}


def parse_kvbm(text: str) -> dict[str, float | int | None]:
    """{"host_cache_hit_rate": 0.5, "matched_tokens": 96, ...} with None for absent families."""
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
    out: dict[str, float | int | None] = {}
    for name in GAUGES + COUNTERS:
        family = families.get(name) or families.get(name + "_total")  # untyped exposition
        key = name.removeprefix("kvbm_")
        if family is None:
            out[key] = None
            continue
        values = [
            s.value
            for s in family.samples
            if s.name in (name, name + "_total") and not s.name.endswith("_created")
        ]
        if not values:
            out[key] = None
        elif name in _RATES:
            out[key] = sum(values) / len(values)
        else:
            total = sum(values)
            out[key] = int(total) if float(total).is_integer() else total
    return out


def read_kvbm(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """The parsed metrics plus `reachable`, and `error` when the endpoint did not answer."""
    try:
        resp = httpx.get(url, timeout=timeout)
        resp.raise_for_status()
        data: dict[str, Any] = {"reachable": True, **parse_kvbm(resp.text)}
    except (httpx.HTTPError, ValueError) as exc:
        data = {"reachable": False, "error": f"{url}: {exc}"}
        data.update({n.removeprefix("kvbm_"): None for n in GAUGES + COUNTERS})
    return data
