"""Replicating a hot prefix: a prefix's heat (decayed requests at its boundary) shares the
recompute of a second copy, so a stream behind one long prefix spreads once the holder's queue
costs more than that share, while a conversation (a new boundary every round) stays put."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from dynkv.kvbm.events import KvTier, Stored, WorkerRates
from dynkv.router.decide import decide
from dynkv.router.heat import PrefixHeat
from dynkv.router.index import KvIndex, PrefixMatch
from dynkv.router.router import KvRouter, Prompt
from dynkv.router.score import Costs, ScorerConfig, WorkerLoad, estimate, estimate_all

BS = 16
FP = "ab" * 16
COSTS = Costs(prefill_tokens_per_s=1000.0, g2_tokens_per_s=100_000.0, g3_tokens_per_s=10_000.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_heat_counts_earlier_requests_halving_every_half_life():
    clock = Clock()
    heat = PrefixHeat(half_life_s=10.0, clock=clock)
    assert [heat.observe(7) for _ in range(3)] == [0.0, 1.0, 2.0]  # the heat before each
    clock.now += 10.0
    assert heat.heat(7) == pytest.approx(1.5)
    assert heat.observe(7) == pytest.approx(1.5) and heat.heat(7) == pytest.approx(2.5)
    assert heat.heat(8) == 0.0 and len(heat) == 1


def test_heat_keeps_the_most_recently_reached_keys():
    heat = PrefixHeat(max_keys=2, clock=Clock())
    for key in (1, 2, 1, 3):  # 2 is the least recently reached when 3 comes
        heat.observe(key)
    assert (heat.heat(1), heat.heat(2), heat.heat(3)) == (2.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        PrefixHeat(half_life_s=0)


def test_blocks_held_elsewhere_cost_their_recompute_shared_with_the_heat():
    cfg = ScorerConfig()
    cold = estimate("w", PrefixMatch(), 1024, BS, COSTS, WorkerLoad(), cfg, fleet_blocks=48)
    hot = estimate("w", PrefixMatch(), 1024, BS, COSTS, WorkerLoad(), cfg, fleet_blocks=48, heat=3)
    assert cold.replica_tokens == hot.replica_tokens == 768
    assert cold.recompute_s == pytest.approx(1.024)  # the whole prompt: one request, no share
    assert hot.recompute_s == pytest.approx((1024 - 768 * 3 / 4) / 1000)  # a quarter of the copy
    part = estimate("w", PrefixMatch(device=16), 1024, BS, COSTS, WorkerLoad(), cfg,
                    fleet_blocks=48, heat=1)  # fmt: skip
    assert part.replica_tokens == 512 and part.recompute_s == pytest.approx((768 - 256) / 1000)
    # Dynamo's constant weights price no replica, whatever the heat
    dynamo = ScorerConfig(tier_weights=(1.0, 0.75, 0.25))
    flat = estimate("w", PrefixMatch(), 1024, BS, COSTS, WorkerLoad(), dynamo, fleet_blocks=48,
                    heat=3)  # fmt: skip
    assert flat.recompute_s == pytest.approx(1.024)


def test_estimate_all_prices_every_candidate_against_the_deepest_match():
    matches = {"a": PrefixMatch(device=48), "b": PrefixMatch(host=16)}
    loads = {"a": WorkerLoad(), "b": WorkerLoad(), "c": WorkerLoad()}
    by = {e.worker: e for e in estimate_all(matches, 1024, BS, loads, {}, ScorerConfig(), 1.0)}
    assert [by[w].replica_tokens for w in "abc"] == [0, 512, 768]


def prompts(prefix: list[int], n: int, rng: random.Random) -> list[list[int]]:
    return [prefix + [rng.getrandbits(128) for _ in range(4)] for _ in range(n)]


def test_a_stream_behind_one_prefix_gets_a_second_copy_when_the_holders_queue_costs_more():
    """Every prompt: one 64-block prefix held on a (in G1), then a short question. a's queue of
    0.26 s is less than the 1.09 s the whole prompt costs b, so the first requests stay; from the
    sixth (heat 5: b's share of the copy 0.17 s) the stream goes to b (reason kv_replica)."""
    rng = random.Random(0)
    prefix = [rng.getrandbits(128) for _ in range(64)]
    index = KvIndex()
    index.stored("a", KvTier.DEVICE, prefix)
    loads = {"a": WorkerLoad(outstanding_prefill_tokens=200), "b": WorkerLoad()}
    heat = PrefixHeat()
    fixed = ScorerConfig(default_prefill_tokens_per_s=1000.0)
    chosen = [
        decide(index, keys, 68 * BS, BS, loads, {}, fixed, rng, heat)
        for keys in prompts(prefix, 8, rng)
    ]
    assert [d.chosen.worker for d in chosen] == ["a"] * 5 + ["b"] * 3
    assert [d.reason for d in chosen[4:6]] == ["kv", "kv_replica"]
    # without heat the stream piles on the holder, whatever the number of requests
    piled = [decide(index, k, 68 * BS, BS, loads, {}, fixed, rng) for k in prompts(prefix, 20, rng)]
    assert {d.chosen.worker for d in piled} == {"a"}


def fed_router(cfg: ScorerConfig) -> KvRouter:
    """A KvRouter that believes NATS is up and knows two workers' keys (no blocks yet)."""
    router = KvRouter("nats://127.0.0.1:1", "d", cfg)
    router.subscriber.nc = SimpleNamespace(is_connected=True)
    for w in ("agg-0", "agg-1"):
        router.sync.on_rates(
            WorkerRates(worker_id=w, instance_id="i", seq=0, ts=0, block_size=BS, fingerprint=FP)
        )
    return router


def test_the_router_copies_a_hot_prefix_but_keeps_a_conversation_on_its_worker():
    rng = random.Random(1)
    cfg = ScorerConfig(default_prefill_tokens_per_s=1000.0)
    router = fed_router(cfg)
    system = [rng.randrange(32000) for _ in range(64 * BS)]
    router.index.apply(
        "agg-0", Stored(tier=KvTier.HOST, keys=router.prompt_keys(Prompt(system), FP, BS))
    )
    busy = {"agg-0": WorkerLoad(outstanding_prefill_tokens=200), "agg-1": WorkerLoad()}

    # a conversation: every round resends the history, so every round ends at a new boundary
    history = list(system)
    for _ in range(8):
        history += [rng.randrange(32000) for _ in range(3 * BS)]
        d = router.pick(Prompt(history), busy)
        assert (d.chosen.worker, d.reason) == ("agg-0", "kv")
        router.prefilled(d)

    # many users behind the same system prompt: the same boundary, hotter with each request
    users = [
        router.pick(Prompt(system + [rng.randrange(32000) for _ in range(40)]), busy)
        for _ in range(8)
    ]
    # heat 1 (the conversation's first round stopped there too) to 4 stay; the fifth is a copy
    assert [d.chosen.worker for d in users] == ["agg-0"] * 4 + ["agg-1"] * 4
    assert router.decisions["kv_replica"] == 1  # once copied (in flight), agg-1 holds it too
    assert router.stats()["hot_prefixes"] >= 2

    # off: the stream piles on the holder
    off = fed_router(ScorerConfig(default_prefill_tokens_per_s=1000.0, replica_half_life_s=0))
    off.index.apply("agg-0", Stored(tier=KvTier.HOST, keys=off.prompt_keys(Prompt(system), FP, BS)))
    piled = {off.pick(Prompt(system + [rng.randrange(32000) for _ in range(40)]), busy).chosen.worker
             for _ in range(12)}  # fmt: skip
    assert piled == {"agg-0"} and off.heat is None


def test_an_estimate_answers_as_pick_would_and_leaves_no_trace():
    rng = random.Random(2)
    router = fed_router(ScorerConfig(default_prefill_tokens_per_s=1000.0))
    system = [rng.randrange(32000) for _ in range(64 * BS)]
    router.index.apply(
        "agg-0", Stored(tier=KvTier.HOST, keys=router.prompt_keys(Prompt(system), FP, BS))
    )
    busy = {"agg-0": WorkerLoad(outstanding_prefill_tokens=200), "agg-1": WorkerLoad()}
    prompt = system + [rng.randrange(32000) for _ in range(40)]

    # polled as a probe polls: no heat builds, nothing is recorded as headed anywhere
    polls = [router.estimate(Prompt(prompt), busy) for _ in range(10)]
    assert {(e.chosen.worker, e.reason, e.heat, e.in_flight) for e in polls} == {
        ("agg-0", "kv", 0.0, None)
    }
    assert not router.decisions and len(router.inflight) == 0 and len(router.heat) == 0

    d = router.pick(Prompt(prompt), busy)  # the same answer, and now it counts
    assert (d.chosen.worker, d.reason, d.heat) == ("agg-0", "kv", 0.0)
    assert router.decisions == {"kv": 1} and len(router.inflight) == 1 and len(router.heat) == 1
    # another user's question stops at the same boundary: it reads the heat pick counted
    e = router.estimate(Prompt(system + [rng.randrange(32000) for _ in range(40)]), busy)
    assert e.chosen.worker == "agg-0" and e.heat == pytest.approx(1.0, rel=1e-3)
    assert router.decisions == {"kv": 1} and len(router.inflight) == 1
    assert router.heat.heat(router.prompt_keys(Prompt(system), FP, BS)[-1]) == pytest.approx(
        1.0, 1e-3
    )

    router.subscriber.nc = SimpleNamespace(is_connected=False)  # by load, still uncounted
    assert router.estimate(Prompt(prompt), busy).reason == "nats_down"
    assert router.decisions == {"kv": 1}
