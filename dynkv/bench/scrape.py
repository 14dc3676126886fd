"""Read the workers' KVBM metrics (Prometheus text) before and after a run.

Parsing is `dynkv.metrics_text`'s (shared with `dynkv status`): families keyed by name, counters
without their `_total` suffix whether or not the exposition carries `# TYPE` lines. Only the
families `dynkv bench serve` reports are kept. A target that cannot be read, or lacks a family,
yields no value for it: the report shows null, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from dynkv import metrics_text
from dynkv.kvbm.counters import Count

# the window gauges: what a runtime without the lookup counters offers instead
GAUGES = tuple(metrics_text.RATE_GAUGES.values())
# Tier capacities: a worker with neither (a disagg decode worker, fed by the handoff) has no tier
# whose hit rate or matched tokens could mean anything.
SIZES = tuple(metrics_text.TIER_SIZES.values())
COUNTERS = tuple(
    c.metric
    for c in (
        Count.ONBOARD_H2D,
        Count.ONBOARD_D2D,
        Count.MATCHED_TOKENS,
        Count.LOOKUP_BLOCKS,
        Count.HOST_HIT_BLOCKS,
        Count.DISK_HIT_BLOCKS,
    )
)


@dataclass
class Snapshot:
    """One target's values by family name (labels summed); `error` when it could not be read."""

    url: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def parse(text: str, families: tuple[str, ...] = GAUGES + SIZES + COUNTERS) -> dict[str, float]:
    """Family name → value (`dynkv.metrics_text.parse`)."""
    return metrics_text.parse(text, families)


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    try:
        return Snapshot(url, metrics_text.fetch(url, timeout_s, GAUGES + SIZES + COUNTERS))
    except (httpx.HTTPError, ValueError) as exc:
        return Snapshot(url, error=f"{type(exc).__name__}: {exc}")


def scrape_all(urls: list[str], timeout_s: float = 5.0) -> list[Snapshot]:
    return [scrape(url, timeout_s) for url in urls]
