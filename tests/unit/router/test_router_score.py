"""TTFT scoring and the choice: tiers, measured rates, loads, ties, temperature, Dynamo weights."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynkv.kvbm.events import KvTier, PrefillRate, WorkerRates
from dynkv.router.decide import decide
from dynkv.router.index import KvIndex, PrefixMatch
from dynkv.router.score import (
    DYNAMO_TIER_WEIGHTS,
    Costs,
    ScorerConfig,
    WorkerLoad,
    choose,
    costs_for,
    estimate,
)

BS = 16
COSTS = Costs(prefill_tokens_per_s=1000.0, g2_tokens_per_s=100_000.0, g3_tokens_per_s=10_000.0)
CFG = ScorerConfig()
IDLE = WorkerLoad()


def est(match: PrefixMatch, load: WorkerLoad = IDLE, costs: Costs = COSTS, cfg: ScorerConfig = CFG):
    return estimate("w", match, 1024, BS, costs, load, cfg)


def test_a_device_hit_beats_host_beats_disk_beats_a_miss():
    blocks = 32
    times = [est(PrefixMatch(**{t: blocks})).ttft_s for t in ("device", "host", "disk")]
    miss = est(PrefixMatch()).ttft_s
    assert times == sorted(times) and times[-1] < miss
    e = est(PrefixMatch(host=32))
    assert e.load_s == pytest.approx(32 * BS / 100_000)
    assert e.recompute_s == pytest.approx((1024 - 512) / 1000)
    assert e.cached_tokens == 512


def test_the_last_prompt_token_is_always_computed():
    e = estimate("w", PrefixMatch(device=64), 1024, BS, COSTS, IDLE, CFG)
    assert e.cached_tokens == 1008  # 63 blocks: vLLM recomputes at least one token
    assert e.recompute_s == pytest.approx(16 / 1000)


def test_a_slow_disk_can_lose_to_recomputing():
    slow_disk = Costs(1000.0, 100_000.0, 500.0)  # disk slower than prefill
    assert est(PrefixMatch(disk=32), costs=slow_disk).ttft_s > est(PrefixMatch()).ttft_s


def test_queueing_outweighs_a_hit_on_a_busy_worker():
    hit_busy = est(PrefixMatch(device=32), WorkerLoad(outstanding_prefill_tokens=8000))
    miss_idle = est(PrefixMatch())
    assert hit_busy.queue_s == pytest.approx(8.0)
    assert miss_idle.ttft_s < hit_busy.ttft_s
    decode = ScorerConfig(decode_seconds_per_request=0.05)
    assert est(PrefixMatch(), WorkerLoad(running_requests=4), cfg=decode).queue_s == pytest.approx(
        0.2
    )


def test_dynamo_tier_weights_count_host_and_disk_hits_as_fractions_and_ignore_loads():
    cfg = ScorerConfig(tier_weights=DYNAMO_TIER_WEIGHTS)
    host = est(PrefixMatch(host=32), cfg=cfg)
    disk = est(PrefixMatch(disk=32), cfg=cfg)
    assert host.load_s == 0 and host.recompute_s == pytest.approx((1024 - 0.75 * 512) / 1000)
    assert disk.recompute_s == pytest.approx((1024 - 0.25 * 512) / 1000)


def test_rates_come_from_the_matching_prefill_bucket_else_the_nearest_else_defaults():
    rates = WorkerRates(
        worker_id="w",
        instance_id="i",
        seq=0,
        ts=0,
        block_size=BS,
        prefill=[
            PrefillRate(min_tokens=0, max_tokens=1024, tokens_per_s=4000, samples=3),
            PrefillRate(min_tokens=1024, max_tokens=4096, tokens_per_s=3000, samples=3),
        ],
        g3_to_g1_tokens_per_s=777,
    )
    assert costs_for(rates, 100, CFG).prefill_tokens_per_s == 4000
    assert costs_for(rates, 2000, CFG).prefill_tokens_per_s == 3000
    assert costs_for(rates, 9000, CFG).prefill_tokens_per_s == 3000
    c = costs_for(rates, 100, CFG)
    assert (c.g2_tokens_per_s, c.g3_tokens_per_s) == (CFG.default_g2_tokens_per_s, 777)
    assert costs_for(None, 100, CFG).prefill_tokens_per_s == CFG.default_prefill_tokens_per_s


def named(worker: str, match: PrefixMatch, load: WorkerLoad = IDLE):
    return estimate(worker, match, 1024, BS, COSTS, load, CFG)


def test_exact_ties_are_broken_at_random_and_the_best_wins_at_zero_temperature():
    rng = random.Random(1)
    tied = [named(w, PrefixMatch()) for w in "abc"]
    picks = Counter(choose(tied, 0, rng).worker for _ in range(300))
    assert set(picks) == {"a", "b", "c"}
    best = [named("a", PrefixMatch()), named("b", PrefixMatch(device=10))]
    assert {choose(best, 0, rng).worker for _ in range(50)} == {"b"}
    with pytest.raises(ValueError):
        choose([], 0)


def test_temperature_shares_near_ties_and_rarely_picks_a_clearly_worse_worker():
    rng = random.Random(2)
    near = [named("a", PrefixMatch(device=30)), named("b", PrefixMatch(device=29))]
    far = named("c", PrefixMatch())  # about twice as slow
    picks = Counter(choose([*near, far], 0.1, rng).worker for _ in range(2000))
    assert picks["a"] > 400 and picks["b"] > 400
    assert picks["c"] < 20


def test_decide_routes_a_conversation_to_the_worker_holding_its_prefix():
    idx = KvIndex()
    keys = list(range(100, 164))  # 64 blocks = 1024 tokens
    idx.stored("holder", KvTier.HOST, keys[:48])
    loads = {"holder": WorkerLoad(), "other": WorkerLoad(), "unknown": WorkerLoad()}
    d = decide(idx, keys, 1024, BS, loads, {}, CFG, random.Random(0))
    assert d.chosen.worker == "holder" and d.chosen.cached_tokens == 48 * BS
    assert {e.worker for e in d.estimates} == set(loads) and d.seconds > 0
    busy = {**loads, "holder": WorkerLoad(outstanding_prefill_tokens=100_000)}
    assert decide(idx, keys, 1024, BS, busy, {}, CFG, random.Random(0)).chosen.worker != "holder"


def test_bench_router_reports_decision_times_as_json():
    import json

    from typer.testing import CliRunner

    from dynkv.cli.main import app

    args = ["bench", "router", "--blocks", "5000", "--workers", "3", "--prompt-tokens", "2048"]
    result = CliRunner().invoke(app, [*args, "--decisions", "20", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["indexed_blocks"] >= 5000 and out["workers"] == 3 and out["decisions"] == 20
    assert 0 < out["decide_cpu_p50_ms"] <= out["decide_cpu_p99_ms"]


def test_bench_router_prices_every_worker_with_measured_rates_as_published():
    """The timed decisions take the scoring's whole path: every length the prompt can leave to
    compute falls in a measured bucket, the tiers and decode have measured costs."""
    from dynkv.router.bench import _measured_rates

    rates = _measured_rates("agg-0", BS, 8192, random.Random(0))
    bounds = [(b.min_tokens, b.max_tokens) for b in rates.prefill]
    assert bounds[0][0] == 0 and bounds[-1][1] > 8192
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous
    assert rates.g2_to_g1_tokens_per_s and rates.g3_to_g1_tokens_per_s
    assert rates.decode_seconds_per_request


def rates_of(**kw) -> WorkerRates:
    return WorkerRates(worker_id="w", instance_id="i", seq=0, ts=0, block_size=BS, **kw)


def test_a_workers_measured_decode_cost_prices_its_running_requests():
    cfg = ScorerConfig(decode_seconds_per_request=0.01)
    busy = WorkerLoad(running_requests=4)
    measured = costs_for(rates_of(decode_seconds_per_request=0.05), 100, cfg)
    assert measured.decode_seconds_per_request == 0.05
    assert est(PrefixMatch(), busy, costs=measured, cfg=cfg).queue_s == pytest.approx(0.2)
    unmeasured = costs_for(rates_of(), 100, cfg)  # the frontend's setting until measured
    assert est(PrefixMatch(), busy, costs=unmeasured, cfg=cfg).queue_s == pytest.approx(0.04)


def holder_and_other(short_tps, long_tps, long_from, prompt_blocks, held_blocks, holder_load):
    """A decision between a worker holding the first `held_blocks` of the prompt and an idle one
    holding nothing, both having measured `short_tps` for prefills ≤ 128 tokens and `long_tps`
    from `long_from` tokens up to 4,096; the decision and its estimates by worker."""
    speeds = [
        PrefillRate(min_tokens=0, max_tokens=129, tokens_per_s=short_tps, samples=5),
        PrefillRate(min_tokens=long_from, max_tokens=4097, tokens_per_s=long_tps, samples=5),
    ]
    rates = {w: rates_of(prefill=speeds) for w in ("holder", "other")}
    idx = KvIndex()
    keys = list(range(1000, 1000 + prompt_blocks))
    idx.stored("holder", KvTier.DEVICE, keys[:held_blocks])
    loads = {"holder": holder_load, "other": WorkerLoad()}
    d = decide(idx, keys, prompt_blocks * BS, BS, loads, rates, CFG, random.Random(0))
    return d, {e.worker: e for e in d.estimates}


def test_prefill_is_priced_at_the_speed_of_the_length_each_worker_would_compute():
    # short prefills measured 10× faster per token than long ones (as the worker buckets them:
    # by the tokens it computes, the prompt less its cache hit); all but 64 of 1,024 tokens held
    _, by = holder_and_other(20_000, 2_000, 513, 64, 60, WorkerLoad())
    assert by["holder"].recompute_s == pytest.approx(64 / 20_000)
    assert by["other"].recompute_s == pytest.approx(1024 / 2_000)


def test_the_oldest_queued_prompt_counts_only_what_it_has_left_to_compute():
    fresh = WorkerLoad(outstanding_prefill_tokens=3000, head_prefill_tokens=2000)
    half = WorkerLoad(3000, head_prefill_tokens=2000, head_prefill_elapsed_s=1.0)
    late = WorkerLoad(3000, head_prefill_tokens=2000, head_prefill_elapsed_s=5.0)
    assert est(PrefixMatch(), fresh).queue_s == pytest.approx(3.0)  # 1,000 tokens/s
    assert est(PrefixMatch(), half).queue_s == pytest.approx(2.0)
    assert est(PrefixMatch(), late).queue_s == pytest.approx(1.0)  # the rest waits in full
    # so a conversation stays where its prefix is while the worker finishes another prompt
    finishing = WorkerLoad(2000, head_prefill_tokens=2000, head_prefill_elapsed_s=1.9)
    just_sent = WorkerLoad(2000, head_prefill_tokens=2000)
    miss_idle = est(PrefixMatch()).ttft_s  # the other worker: 1,024 tokens to recompute
    assert est(PrefixMatch(device=60), finishing).ttft_s < miss_idle
    assert est(PrefixMatch(device=60), just_sent).ttft_s > miss_idle


def test_queued_prompts_are_priced_at_the_speed_of_their_own_length():
    # effective speeds as a CPU worker measures them under load: a short prefill is about one
    # step, so few tokens a second; a long one many. All but 32 of 4,096 tokens held; a
    # 2,000-token prompt queued on the holder.
    queued = WorkerLoad(outstanding_prefill_tokens=2000, head_prefill_tokens=2000)
    d, by = holder_and_other(200, 2_000, 1025, 256, 254, queued)
    assert by["holder"].queue_s == pytest.approx(2000 / 2_000)  # not 2000 / 200 = 10 s
    assert by["holder"].recompute_s == pytest.approx(32 / 200)
    assert by["other"].ttft_s == pytest.approx(4096 / 2_000)
    assert d.chosen.worker == "holder"  # 1.16 s against 2.05 s
