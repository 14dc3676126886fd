"""KVBM metrics read from Prometheus text: the one parser and the one hit-rate rule that
`dynkv status` (`dynkv.supervisor.metrics`) and `dynkv bench` (`dynkv.bench.scrape`,
`dynkv.bench.report`) share.

It lives at the top of the package because both readers use it and neither should import the
other; the family names come from the runtime (`dynkv.kvbm.counters`), where they are defined.

Parsing: families are keyed by name. A counter is `<name>_total` on the wire and keyed `<name>`
(with or without `# TYPE` lines; `_created` is skipped); a gauge named `…_total` (a tier's
capacity) keeps its name. Values are summed over label sets, except the hit-rate gauges, which are
ratios and are averaged. A family that is absent is absent from the result, never 0.

Hit rates across workers (`hit_rates`): Σ hits / Σ lookups, from the `kvbm_lookup_blocks` and
`kvbm_{host,disk}_hit_blocks` counters (totals for `status`, after − before for `bench`), over the
workers that have the tier (`kvbm_{tier}_blocks_total` not 0: a disagg decode worker, fed by the
handoff, has neither). A mean of per-worker ratios would weigh an idle worker like a busy one,
and a sum is not a rate. Where a worker exposes no lookup counter (a runtime that predates it, or
Dynamo's own KVBM) the rule falls back to the mean of the workers' window gauges.
"""

from __future__ import annotations

import ssl
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynkv.kvbm.counters import Count

TIERS = ("host", "disk")
RATE_GAUGES = {t: f"kvbm_{t}_cache_hit_rate" for t in TIERS}
TIER_SIZES = {t: f"kvbm_{t}_blocks_total" for t in TIERS}
USED_GAUGES = {t: f"kvbm_{t}_blocks_used" for t in TIERS}
HITS = {"host": Count.HOST_HIT_BLOCKS.metric, "disk": Count.DISK_HIT_BLOCKS.metric}
LOOKUPS = Count.LOOKUP_BLOCKS.metric
GAUGES = (*RATE_GAUGES.values(), *TIER_SIZES.values(), *USED_GAUGES.values())
# The load-or-recompute policy's counters (docs/advise.md): read by name, so a runtime that predates
# them simply lacks them (absent, never 0). Skipped blocks carry {tier, reason} labels.
SKIPPED = Count.ONBOARD_SKIPPED.metric
SAVED = Count.PREFILL_SECONDS_SAVED.metric
COUNTERS = tuple(c.metric for c in Count)
FAMILIES = GAUGES + COUNTERS
K = TypeVar("K", bound=Hashable)


def increase(start: float | None, end: float) -> float:
    """A counter's increase from `start` (None: not read before, 0) to `end`. A counter that went
    down belongs to a process that restarted in between: it counts from zero, so `end` is all of
    its increase that can be known."""
    start = start or 0.0
    return end - start if end >= start else end


def increases(before: Mapping[K, float], after: Mapping[K, float]) -> dict[K, float]:
    """`increase` per key of `after` (a family or label set that appeared started from 0)."""
    return {key: increase(before.get(key), end) for key, end in after.items()}


def parse(text: str, families: Iterable[str] = FAMILIES) -> dict[str, float]:
    """Family name → value (see the module docstring); ValueError on text that is not an
    exposition."""
    wanted = set(families)
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name if family.name in wanted else family.name.removesuffix("_total")
        if name not in wanted:
            continue
        for sample in family.samples:
            if sample.name in (name, f"{name}_total"):
                values.setdefault(name, []).append(float(sample.value))
    rates = set(RATE_GAUGES.values())
    return {
        name: sum(xs) / len(xs) if name in rates else sum(xs) for name, xs in values.items() if xs
    }


def labelled(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """One counter family's values per label set (sorted (label, value) pairs), for the families
    whose labels matter (`kvbm_onboard_skipped_blocks{tier,reason}`); {} when absent."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.removesuffix("_total") != family:
            continue
        for sample in fam.samples:
            if sample.name in (family, f"{family}_total"):
                key = tuple(sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def fetch_text(
    url: str,
    timeout: float,
    *,
    headers: Mapping[str, str] | None = None,
    verify: bool | ssl.SSLContext = True,
) -> str:
    """GET one endpoint's exposition; raises httpx.HTTPError. `headers`: a frontend's bearer key;
    `verify`: a context trusting a frontend's own certificate."""
    response = httpx.get(url, timeout=timeout, headers=headers, verify=verify)
    response.raise_for_status()
    return response.text


def fetch(url: str, timeout: float, families: Iterable[str] = FAMILIES) -> dict[str, float]:
    """GET and parse one endpoint; raises httpx.HTTPError or ValueError."""
    return parse(fetch_text(url, timeout), families)


def _has_tier(target: Mapping[str, float | None], tier: str) -> bool:
    return target.get(TIER_SIZES[tier]) != 0  # unknown (an older runtime) counts as present


def hit_rates(targets: Iterable[Mapping[str, float | None]]) -> dict[str, float | None]:
    """{"host": …, "disk": …} over `targets` (one mapping of family → value per worker: the
    counters as totals or as deltas, the gauges as read). None where no worker has the tier or
    no block was asked of KVBM."""
    targets = list(targets)
    out: dict[str, float | None] = {}
    for tier in TIERS:
        having = [t for t in targets if _has_tier(t, tier)]
        if having and all(t.get(LOOKUPS) is not None for t in having):
            lookups = sum(t[LOOKUPS] or 0.0 for t in having)
            hits = sum(t.get(HITS[tier]) or 0.0 for t in having)
            out[tier] = hits / lookups if lookups else None
        else:
            gauges = [t[RATE_GAUGES[tier]] for t in having if t.get(RATE_GAUGES[tier]) is not None]
            out[tier] = sum(gauges) / len(gauges) if gauges else None
    return out
