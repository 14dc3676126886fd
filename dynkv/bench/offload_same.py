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
    """One same-engine configuration's latencies (ms), as the engine measured them. The lists
    pair up by index: `cold_offloaded_ms[i]` and `cold_private_ms[i]` are one document's,
    `floor_ms[j]` and `tier_ms[j]` one document's in one pass."""

    cold_offloaded_ms: list[float]
    cold_private_ms: list[float]
    floor_ms: list[float]
    tier_ms: list[float]


class SameEngineFigures(Record):
    """Medians of one same-engine configuration, and its ratios: each the median of the ratios of
    paired samples (the same document, measured close together), so a drift within the engine
    over the run (a floor pass at 55 ms, a later one at 85 on this machine kind) cancels out."""

    floor_ms: float
    tier_ms: float
    tier_vs_floor: float
    cold_offloaded_ms: float
    cold_private_ms: float
    cold_overhead: float


def figures(run: SameEngineRun) -> SameEngineFigures:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    def paired(num: list[float], den: list[float]) -> float:
        return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)

    return SameEngineFigures(
        floor_ms=med(run.floor_ms),
        tier_ms=med(run.tier_ms),
        tier_vs_floor=paired(run.tier_ms, run.floor_ms),
        cold_offloaded_ms=med(run.cold_offloaded_ms),
        cold_private_ms=med(run.cold_private_ms),
        cold_overhead=paired(run.cold_offloaded_ms, run.cold_private_ms),
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
