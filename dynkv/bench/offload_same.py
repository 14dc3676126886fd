"""W1 inside one engine (`bench offload`'s `g2_same` and `g3_same`, docs/benchmarks.md#w1-in-one-engine).

Two engines started with the same arguments on this machine kind differ by more than W1's
targets allow (round 1 by up to a fifth, round 2 by a tenth or more), so a ratio of two engines'
medians carries that spread. These configurations measure each ratio inside one engine whose
device KV holds every document: the floor is a pass served by vLLM's own prefix cache, the tier
a pass served back from G2 (or G3) after vLLM's prefix cache is reset, alternating; the cold
overhead compares every document sent cold offloaded with the same document sent cold and kept
out of the tiers (`kv_transfer_params={"dynkv": {"offload": false}}`, docs/kvbm.md), each under
a cache salt of its own. The engine side is `dynkv.bench.offload_engine.same_engine`.
"""

from __future__ import annotations

import statistics

from dynkv.bench.summary import Record

SAME_ENGINE = {"g2_same": "g2", "g3_same": "g3"}  # configuration -> the tier it measures
TARGET = {"g2": 1.1, "g3": 1.3}  # tier ≤ this × floor
COLD_TARGET = 1.03
PASSES = 3  # floor/tier pass pairs per engine


class SameEngineRun(Record):
    """One same-engine configuration's latencies (ms), as the engine measured them."""

    cold_offloaded_ms: list[float]
    cold_private_ms: list[float]
    floor_ms: list[float]
    tier_ms: list[float]


class SameEngineFigures(Record):
    """Medians of one same-engine configuration and its ratios."""

    floor_ms: float
    tier_ms: float
    tier_vs_floor: float
    cold_offloaded_ms: float
    cold_private_ms: float
    cold_overhead: float


def figures(run: SameEngineRun) -> SameEngineFigures:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    floor, tier = med(run.floor_ms), med(run.tier_ms)
    offloaded, private = med(run.cold_offloaded_ms), med(run.cold_private_ms)
    return SameEngineFigures(
        floor_ms=floor,
        tier_ms=tier,
        tier_vs_floor=round(tier / floor, 3),
        cold_offloaded_ms=offloaded,
        cold_private_ms=private,
        cold_overhead=round(offloaded / private, 3),
    )


def summarize(results: dict[str, dict]) -> tuple[dict[str, dict], dict[str, bool]]:
    """(figures by tier, targets) of the same-engine configurations among `results`. The cold
    overhead is G2's engine's (G3's when G2's did not run): the write-through a cold request pays."""
    by_tier: dict[str, SameEngineFigures] = {}
    for name, tier in SAME_ENGINE.items():
        run = results.get(name, {}).get("same_engine")
        if run is not None:
            by_tier[tier] = figures(SameEngineRun.model_validate(run))
    targets = {
        f"{tier}_le_{TARGET[tier]}x_floor_same_engine": f.tier_vs_floor <= TARGET[tier]
        for tier, f in by_tier.items()
    }
    if by_tier:
        cold = (by_tier.get("g2") or by_tier["g3"]).cold_overhead
        targets[f"cold_overhead_le_{COLD_TARGET}_same_engine"] = cold <= COLD_TARGET
    return {t: f.model_dump() for t, f in by_tier.items()}, targets
