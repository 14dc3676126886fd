"""One routing decision: match the prompt's block keys in the index, estimate, choose."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dynkv.kvbm.events import WorkerRates
from dynkv.router.index import KvIndex
from dynkv.router.score import Estimate, ScorerConfig, WorkerLoad, choose, estimate_all


@dataclass
class Decision:
    chosen: Estimate
    estimates: list[Estimate]
    seconds: float  # time the decision took (the router's decision-time histogram)
    reason: str = "kv"  # kv (a cached prefix won), kv_miss (none cached), nats_down (by load)
    in_flight: int | None = None  # the router's record of the prompt's blocks headed there


def decide(
    index: KvIndex,
    keys: Sequence[int],
    prompt_tokens: int,
    block_size: int,
    loads: Mapping[str, WorkerLoad],
    rates: Mapping[str, WorkerRates],
    cfg: ScorerConfig,
    rng: random.Random | None = None,
) -> Decision:
    """Pick among the workers of `loads` (the healthy candidates) for a prompt whose full blocks
    have `keys`."""
    t0 = time.perf_counter()
    matches = index.match(keys)
    estimates = estimate_all(matches, prompt_tokens, block_size, loads, rates, cfg)
    chosen = choose(estimates, cfg.temperature, rng)
    reason = "kv" if chosen.cached_tokens else "kv_miss"
    return Decision(chosen, estimates, time.perf_counter() - t0, reason)
