"""Read the workers' KVBM metrics (Prometheus text) before and after a run.

Only the families `dynkv bench serve` reports are kept. Counters appear on the wire with a
`_total` suffix (`kvbm_matched_tokens_total`); they are keyed here by their family name
(`kvbm_matched_tokens`), whether or not the exposition carries `# TYPE` lines. A target that
cannot be read, or lacks a family, yields no value for it: the report shows null, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate")
# Tier capacities: a worker with neither (a disagg decode worker, fed by the handoff) has no tier
# whose hit rate or matched tokens could mean anything.
SIZES = ("kvbm_host_blocks_total", "kvbm_disk_blocks_total")
COUNTERS = ("kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d", "kvbm_matched_tokens")


@dataclass
class Snapshot:
    """One target's values by family name (labels summed); `error` when it could not be read."""

    url: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def parse(text: str, families: tuple[str, ...] = GAUGES + SIZES + COUNTERS) -> dict[str, float]:
    """Family name → value summed over label sets; `_created` and histogram parts are skipped."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        # a counter's family drops `_total`; a gauge named `…_total` (a tier's capacity) keeps it
        name = family.name if family.name in families else family.name.removesuffix("_total")
        if name not in families:
            continue
        for sample in family.samples:
            if sample.name in (name, f"{name}_total"):
                out[name] = out.get(name, 0.0) + float(sample.value)
    return out


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
        return Snapshot(url, parse(response.text))
    except (httpx.HTTPError, ValueError) as exc:
        return Snapshot(url, error=f"{type(exc).__name__}: {exc}")


def scrape_all(urls: list[str], timeout_s: float = 5.0) -> list[Snapshot]:
    return [scrape(url, timeout_s) for url in urls]
