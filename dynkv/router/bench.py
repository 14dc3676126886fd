"""`dynkv bench router`: decision time at fleet scale, without any worker.

Fills an index with `indexed_blocks` blocks spread over `workers` workers (chains of one
prompt's length, each held by one to three workers in a random tier), then times decisions for
prompts of `prompt_tokens` tokens that share a random part of an indexed chain (each prompt
is built outside the timed region). Every worker is priced as on a live fleet: measured rates
as workers publish them (a prefill speed per power-of-two length bucket, G2 and G3 load speeds,
a decode cost) and a queue whose oldest prompt has been computing a while. Reports the decision
time (index match + scoring + choice) and, apart, the time to compute the prompt's chained block
keys, which the router also pays per request.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from dynkv.kvbm.events import TIERS, WorkerRates
from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.onboard_policy import MIN_BUCKET, PrefillRates
from dynkv.router.decide import decide
from dynkv.router.heat import PrefixHeat
from dynkv.router.index import KvIndex
from dynkv.router.score import ScorerConfig, WorkerLoad


@dataclass(frozen=True)
class RouterBenchResult:
    indexed_blocks: int
    workers: int
    prompt_tokens: int
    block_size: int
    decisions: int
    decide_p50_ms: float
    decide_p99_ms: float
    decide_max_ms: float
    # CPU time of the same decisions: on a busy host the wall time includes waiting for a core
    decide_cpu_p50_ms: float
    decide_cpu_p99_ms: float
    keys_p50_ms: float  # chained keys of the prompt (xxh3 per block)
    index_memory_mb: float
    fill_seconds: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _measured_rates(name: str, block_size: int, max_tokens: int, rng: random.Random) -> WorkerRates:
    """A worker's rates message with every prefill bucket up to `max_tokens` measured, built by
    the worker's own `PrefillRates` from one prefill of each power-of-two length."""
    prefill, length = PrefillRates(clock=lambda: 0.0), MIN_BUCKET
    while True:
        prefill.add(length, length / rng.uniform(200, 20_000), now=0.0)
        if length > max_tokens:
            break
        length *= 2
    return WorkerRates(
        worker_id=name,
        instance_id=f"{name}-bench",
        seq=0,
        ts=0.0,
        block_size=block_size,
        prefill=prefill.published(),
        g2_to_g1_tokens_per_s=rng.uniform(50_000, 500_000),
        g3_to_g1_tokens_per_s=rng.uniform(5_000, 100_000),
        decode_seconds_per_request=rng.uniform(0.002, 0.09),
    )


def _queue(rng: random.Random) -> WorkerLoad:
    """Outstanding prompts whose oldest has been computing for a while, and running requests."""
    outstanding = rng.randint(0, 4096)
    head = rng.randint(0, outstanding)
    return WorkerLoad(outstanding, rng.randint(0, 8), head, rng.uniform(0.0, 0.5) if head else 0.0)


def run_router_bench(
    *,
    indexed_blocks: int = 1_000_000,
    workers: int = 8,
    prompt_tokens: int = 8192,
    block_size: int = 16,
    decisions: int = 500,
    seed: int = 0,
) -> RouterBenchResult:
    rng = random.Random(seed)
    names = [f"agg-{i}" for i in range(workers)]
    blocks_per_prompt = prompt_tokens // block_size
    index = KvIndex(max_blocks=indexed_blocks + blocks_per_prompt)
    chains: list[list[int]] = []
    t0 = time.perf_counter()
    while len(index) < indexed_blocks:
        n = min(blocks_per_prompt, indexed_blocks - len(index))
        chain = [rng.getrandbits(128) for _ in range(n)]
        for w in rng.sample(names, rng.randint(1, min(3, workers))):
            held = rng.randint(1, n)
            index.stored(w, rng.choice(TIERS), chain[:held])
        chains.append(chain)
    fill = time.perf_counter() - t0
    loads = {w: _queue(rng) for w in names}
    rates = {w: _measured_rates(w, block_size, prompt_tokens, rng) for w in names}
    cfg = ScorerConfig()
    heat = PrefixHeat(cfg.replica_half_life_s)  # decisions count their boundary, as the router's
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(decisions):
        chain = rng.choice(chains)
        shared = rng.randint(0, len(chain))
        keys = chain[:shared] + [rng.getrandbits(128) for _ in range(blocks_per_prompt - shared)]
        c0 = time.thread_time()
        times.append(
            decide(index, keys, prompt_tokens, block_size, loads, rates, cfg, rng, heat).seconds
        )
        cpu.append(time.thread_time() - c0)
    hasher = BlockHasher(b"bench", block_size)
    tokens = [rng.randrange(32000) for _ in range(prompt_tokens)]
    key_times = []
    for _ in range(20):
        t = time.perf_counter()
        hasher.keys(tokens)
        key_times.append(time.perf_counter() - t)
    return RouterBenchResult(
        indexed_blocks=len(index),
        workers=workers,
        prompt_tokens=prompt_tokens,
        block_size=block_size,
        decisions=decisions,
        decide_p50_ms=statistics.median(times) * 1e3,
        decide_p99_ms=_percentile(times, 0.99) * 1e3,
        decide_max_ms=max(times) * 1e3,
        decide_cpu_p50_ms=statistics.median(cpu) * 1e3,
        decide_cpu_p99_ms=_percentile(cpu, 0.99) * 1e3,
        keys_p50_ms=statistics.median(key_times) * 1e3,
        index_memory_mb=index.memory_bytes() / 1e6,
        fill_seconds=fill,
    )
