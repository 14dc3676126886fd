"""One routing decision: match the prompt's block keys in the index, estimate, choose."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dynkv.kvbm.events import WorkerRates
from dynkv.router.heat import PrefixHeat
from dynkv.router.index import KvIndex, PrefixMatch
from dynkv.router.score import (
    Estimate,
    ScorerConfig,
    WorkerLoad,
    choose,
    estimate_all,
    fleet_depth,
)


@dataclass
class Decision:
    chosen: Estimate
    estimates: list[Estimate]
    seconds: float  # time the decision took (the router's decision-time histogram)
    # kv (a cached prefix won), kv_replica (it computes blocks another worker holds), kv_miss
    # (none cached anywhere), nats_down (NATS unreachable: by load)
    reason: str = "kv"
    in_flight: int | None = None  # the router's record of the prompt's blocks headed there
    heat: float = 0.0  # requests that recently stopped at the prompt's boundary (before it)


def decide(
    index: KvIndex,
    keys: Sequence[int],
    prompt_tokens: int,
    block_size: int,
    loads: Mapping[str, WorkerLoad],
    rates: Mapping[str, WorkerRates],
    cfg: ScorerConfig,
    rng: random.Random | None = None,
    heat: PrefixHeat | None = None,
) -> Decision:
    """Pick among the workers of `loads` (the healthy candidates) for a prompt whose full blocks
    have `keys`; `heat` counts the prompt at its boundary and prices replicas with it."""
    t0 = time.perf_counter()
    matches = index.match(keys)
    hot = observe_boundary(heat, matches, loads, prompt_tokens, block_size, lambda _: keys)
    estimates = estimate_all(matches, prompt_tokens, block_size, loads, rates, cfg, hot)
    chosen = choose(estimates, cfg.temperature, rng)
    return Decision(chosen, estimates, time.perf_counter() - t0, reason_of(chosen), heat=hot)


def observe_boundary(
    heat: PrefixHeat | None,
    matches: Mapping[str, PrefixMatch],
    loads: Mapping[str, WorkerLoad],
    prompt_tokens: int,
    block_size: int,
    keys_of: Callable[[str], Sequence[int]],
    *,
    count: bool = True,
) -> float:
    """Count the prompt at its boundary (the deepest block any candidate holds, keyed as that
    worker computes keys) and return the heat there before it: 0 without `heat` or a holder.
    `count=False` only reads it (a decision that sends nothing)."""
    if heat is None:
        return 0.0
    holder, depth = fleet_depth(matches, loads, prompt_tokens, block_size)
    if holder is None:
        return 0.0
    key = keys_of(holder)[depth - 1]
    return heat.observe(key) if count else heat.heat(key)


def reason_of(chosen: Estimate) -> str:
    """The decision's reason label (dynkv_router_decisions_total{reason})."""
    if chosen.replica_tokens:
        return "kv_replica"
    return "kv" if chosen.cached_tokens else "kv_miss"
