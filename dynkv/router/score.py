"""Scoring: the estimated time to first token of a prompt on each worker, and the choice.

TTFT(worker) = recompute time of the prompt tokens it holds in no tier (at its measured prefill
rate) + load time of the blocks it holds in G2/G3 (at its measured G2→G1 / G3→G1 rates) +
queueing: its outstanding prefill tokens at its prefill rate (less what the oldest has computed
so far), plus its running requests at its measured decode cost per request (a new prompt waits
for the step in progress and shares the next with every running request). Rates are the
worker's own measurements (prefill by the length recomputed), `ScorerConfig`'s defaults until
it has published them. G1 hits are free. Blocks another worker holds are priced as a replica: their
recompute shared with the requests expected to follow them (`heat`, see `dynkv.router.heat`), so a
hot prefix gets a second copy once its holder's queue costs more than that share. With `tier_weights` (Dynamo's constants 1 / 0.75 /
0.25) a held block instead counts as that fraction of a device hit and loads cost nothing, for
comparison (docs/kv-events.md). Pure functions: the router's event loop calls them per request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from dynkv.kvbm.events import WorkerRates
from dynkv.router.index import PrefixMatch

DYNAMO_TIER_WEIGHTS = (1.0, 0.75, 0.25)


def parse_tier_weights(text: str | None) -> tuple[float, float, float] | None:
    """`--router-tier-weights`: "G1,G2,G3" (each in [0, 1]) or "dynamo" (Dynamo's constants);
    empty or None: price hits by the workers' measured rates. ValueError with the reason."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text.lower() == "dynamo":
        return DYNAMO_TIER_WEIGHTS
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not three numbers G1,G2,G3 (or 'dynamo')") from None
    if len(weights) != 3 or not all(0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"{text!r}: give three weights G1,G2,G3, each in [0, 1] (or 'dynamo')")
    return weights[0], weights[1], weights[2]


@dataclass(frozen=True)
class ScorerConfig:
    # used until a worker has published a measurement
    default_prefill_tokens_per_s: float = 2_000.0
    default_g2_tokens_per_s: float = 200_000.0
    default_g3_tokens_per_s: float = 50_000.0
    decode_seconds_per_request: float = 0.0  # queueing cost of each request a worker runs
    tier_weights: tuple[float, float, float] | None = None  # (G1, G2, G3); None: measured rates
    temperature: float = 0.0  # 0: the lowest estimate; > 0: softmax among near-ties
    # half-life of a prefix's heat (the requests a replica's recompute is shared with); 0: none
    replica_half_life_s: float = 60.0


@dataclass(frozen=True)
class WorkerLoad:
    """What the frontend knows of a worker's queue right now."""

    outstanding_prefill_tokens: int = 0
    running_requests: int = 0
    # the oldest outstanding prompt (part of the tokens above) and how long it has been computing
    head_prefill_tokens: int = 0
    head_prefill_elapsed_s: float = 0.0


@dataclass(frozen=True)
class Costs:
    prefill_tokens_per_s: float
    g2_tokens_per_s: float
    g3_tokens_per_s: float
    decode_seconds_per_request: float | None = None  # None: the ScorerConfig's
    # the speed of the prompts queued ahead (their own length's bucket); None: prefill's
    queue_tokens_per_s: float | None = None


def prefill_speed(rates: WorkerRates | None, tokens: int, cfg: ScorerConfig) -> float:
    """The worker's measured prefill tokens/s for computing `tokens` tokens (as the worker
    buckets its measurements): the bucket holding that length, else the nearest measured
    bucket, else the default."""
    if rates is None or not rates.prefill:
        return cfg.default_prefill_tokens_per_s

    def distance(b) -> int:
        if b.min_tokens <= tokens < b.max_tokens:
            return 0
        return min(abs(tokens - b.min_tokens), abs(tokens - b.max_tokens))

    return min(rates.prefill, key=distance).tokens_per_s


def costs_for(rates: WorkerRates | None, prefill_tokens: int, cfg: ScorerConfig) -> Costs:
    """The worker's rates for computing `prefill_tokens` tokens (the prompt less what it
    holds): its prefill speed for that length (`prefill_speed`), its load rates and decode
    cost, each the default until measured."""
    prefill = prefill_speed(rates, prefill_tokens, cfg)
    g2, g3 = cfg.default_g2_tokens_per_s, cfg.default_g3_tokens_per_s
    decode = cfg.decode_seconds_per_request
    if rates is not None:
        g2 = rates.g2_to_g1_tokens_per_s or g2
        g3 = rates.g3_to_g1_tokens_per_s or g3
        decode = rates.decode_seconds_per_request or decode
    return Costs(prefill, g2, g3, decode)


def usable_blocks(match: PrefixMatch, prompt_tokens: int, block_size: int) -> int:
    """The matched blocks a worker can reuse: vLLM computes at least the prompt's last token,
    whatever is cached."""
    return min(match.blocks, max(0, (prompt_tokens - 1) // block_size))


@dataclass(frozen=True)
class Estimate:
    worker: str
    ttft_s: float
    cached_tokens: int  # what the index predicts the worker will reuse
    match: PrefixMatch
    recompute_s: float
    load_s: float
    queue_s: float
    replica_tokens: int = 0  # tokens it would compute that another worker holds (a replica)


def prefill_queue_s(load: WorkerLoad, tokens_per_s: float) -> float:
    """Seconds of prefill queued ahead of a new prompt: the oldest prompt's tokens less what its
    time computing has covered, then the rest in full (docs/kv-events.md#scoring)."""
    head = min(load.head_prefill_tokens, load.outstanding_prefill_tokens)
    head_left = max(0.0, head / tokens_per_s - load.head_prefill_elapsed_s)
    return head_left + (load.outstanding_prefill_tokens - head) / tokens_per_s


def estimate(
    worker: str,
    match: PrefixMatch,
    prompt_tokens: int,
    block_size: int,
    costs: Costs,
    load: WorkerLoad,
    cfg: ScorerConfig,
    *,
    fleet_blocks: int = 0,
    heat: float = 0.0,
) -> Estimate:
    """`fleet_blocks`: the deepest usable match of any candidate; `heat`: the requests that
    have recently stopped at that depth (`dynkv.router.heat`)."""
    usable = usable_blocks(match, prompt_tokens, block_size)
    device = min(match.device, usable)
    host = min(match.host, usable - device)
    disk = usable - device - host
    if cfg.tier_weights is not None:
        w1, w2, w3 = cfg.tier_weights
        cached = (device * w1 + host * w2 + disk * w3) * block_size
        load_s = 0.0
    else:
        cached = float(usable * block_size)
        load_s = (
            host * block_size / costs.g2_tokens_per_s + disk * block_size / costs.g3_tokens_per_s
        )
    # blocks held elsewhere: a replica, whose recompute the `heat` requests expected after this
    # one share (docs/kv-events.md#replicating-a-hot-prefix); Dynamo's weights know no replicas
    replica = max(0, fleet_blocks - usable) * block_size
    shared = replica * heat / (1.0 + heat) if cfg.tier_weights is None else 0.0
    recompute_s = max(1.0, prompt_tokens - cached - shared) / costs.prefill_tokens_per_s
    decode = costs.decode_seconds_per_request
    if decode is None:
        decode = cfg.decode_seconds_per_request
    queue_rate = costs.queue_tokens_per_s or costs.prefill_tokens_per_s
    queue_s = prefill_queue_s(load, queue_rate) + load.running_requests * decode
    return Estimate(
        worker=worker,
        ttft_s=recompute_s + load_s + queue_s,
        cached_tokens=usable * block_size,
        match=match,
        recompute_s=recompute_s,
        load_s=load_s,
        queue_s=queue_s,
        replica_tokens=replica,
    )


def choose(
    estimates: Sequence[Estimate], temperature: float = 0.0, rng: random.Random | None = None
) -> Estimate:
    """The lowest estimate (exact ties: at random). With `temperature` T > 0, a softmax over
    each estimate's excess over the best, relative to the best: a worker 10% slower is picked
    with weight exp(-0.1 / T) against the best's 1, so only near-ties share the traffic."""
    if not estimates:
        raise ValueError("no worker to choose from")
    rng = rng or random.Random()
    best = min(e.ttft_s for e in estimates)
    if temperature <= 0:
        tied = [e for e in estimates if e.ttft_s <= best * (1 + 1e-9) + 1e-12]
        return tied[0] if len(tied) == 1 else rng.choice(tied)
    scale = max(best, 1e-3)
    weights = [math.exp(-(e.ttft_s - best) / scale / temperature) for e in estimates]
    return rng.choices(list(estimates), weights=weights, k=1)[0]


def estimate_all(
    matches: Mapping[str, PrefixMatch],
    prompt_tokens: int,
    block_size: int,
    loads: Mapping[str, WorkerLoad],
    rates: Mapping[str, WorkerRates],
    cfg: ScorerConfig,
    heat: float = 0.0,
) -> list[Estimate]:
    """One estimate per worker in `loads` (the healthy candidates); a worker the index does not
    know yet holds nothing. `heat`: that of the candidates' deepest match (`fleet_depth`)."""
    empty = PrefixMatch()
    fleet_blocks = fleet_depth(matches, loads, prompt_tokens, block_size)[1]
    out = []
    for w, load in loads.items():
        match = matches.get(w, empty)
        prefill = prompt_tokens - usable_blocks(match, prompt_tokens, block_size) * block_size
        costs = costs_for(rates.get(w), prefill, cfg)
        # prompts queued ahead run at the speed of their own length, not this prompt's: a short
        # remainder after a hit is slow per token (one step), a long prompt queued is not
        queued = load.head_prefill_tokens or load.outstanding_prefill_tokens
        if queued:
            costs = replace(costs, queue_tokens_per_s=prefill_speed(rates.get(w), queued, cfg))
        out.append(
            estimate(
                w,
                match,
                prompt_tokens,
                block_size,
                costs,
                load,
                cfg,
                fleet_blocks=fleet_blocks,
                heat=heat,
            )
        )
    return out


def fleet_depth(
    matches: Mapping[str, PrefixMatch],
    candidates: Iterable[str],
    prompt_tokens: int,
    block_size: int,
) -> tuple[str | None, int]:
    """The candidate with the deepest usable match and its depth in blocks ((None, 0): none
    holds any): the prompt's boundary, where its heat is counted."""
    best: tuple[str | None, int] = (None, 0)
    for w in candidates:
        match = matches.get(w)
        depth = usable_blocks(match, prompt_tokens, block_size) if match is not None else 0
        if depth > best[1]:
            best = (w, depth)
    return best
