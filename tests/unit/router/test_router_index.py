"""The router's index: tiers per worker, prefix matches, worker removal, the block bound."""

from __future__ import annotations

import random

from dynkv.kvbm.events import Cleared, KvTier, Removed, Stored
from dynkv.router.index import KvIndex, PrefixMatch

G1, G2, G3 = KvTier.DEVICE, KvTier.HOST, KvTier.DISK


def test_a_prefix_match_counts_leading_blocks_by_their_best_tier_per_worker():
    idx = KvIndex()
    idx.stored("a", G1, [1, 2])
    idx.stored("a", G2, [2, 3])  # 2 is also in G1: G1 counts
    idx.stored("a", G3, [4, 6])  # 5 missing: 6 is past the prefix
    idx.stored("b", G3, [1, 2, 3, 4, 5])
    m = idx.match([1, 2, 3, 4, 5, 6])
    assert m["a"] == PrefixMatch(device=2, host=1, disk=1)
    assert m["b"] == PrefixMatch(disk=5)
    assert idx.match([9, 1])["a"].blocks == 0  # a prefix starts at the first block
    assert idx.tiers_of(2) == {"a": G1, "b": G3}


def test_losing_one_copy_keeps_the_other_tier():
    idx = KvIndex()
    idx.stored("a", G2, [1, 2])
    idx.stored("a", G3, [1, 2])
    idx.removed("a", G2, [1])
    assert idx.match([1, 2])["a"] == PrefixMatch(host=1, disk=1)
    idx.removed("a", G3, [1])
    assert idx.match([1, 2])["a"].blocks == 0
    idx.removed("zzz", G3, [1])  # an unknown worker: nothing happens


def test_cleared_drops_one_tier_or_all():
    idx = KvIndex()
    idx.apply("a", Stored(tier=G2, keys=[1, 2]))
    idx.apply("a", Stored(tier=G3, keys=[1]))
    idx.apply("b", Stored(tier=G2, keys=[1]))
    idx.apply("a", Cleared(tier=G2))
    assert idx.match([1, 2])["a"] == PrefixMatch(disk=1)
    idx.apply("a", Removed(tier=G3, keys=[1]))
    idx.apply("b", Cleared())
    assert len(idx) == 0


def test_small_fleets_keep_small_values():
    idx = KvIndex()
    for w in ("a", "b"):
        for t in (G1, G2, G3):
            idx.stored(w, t, [1])
    assert idx._map[1] < 256  # Python's shared small ints: no object per entry


def test_removing_a_worker_forgets_its_blocks_and_frees_its_slot():
    idx = KvIndex()
    idx.stored("a", G2, [1, 2])
    idx.stored("b", G2, [2])
    assert idx.remove_worker("a") == 2
    assert "a" not in idx.match([1, 2]) and len(idx) == 1
    idx.stored("c", G1, [1])  # reuses a's slot with none of a's bits
    assert idx.match([1, 2]) == {"b": PrefixMatch(), "c": PrefixMatch(device=1)}
    assert idx.remove_worker("nobody") == 0


def test_the_index_stays_within_its_block_bound_dropping_the_least_recently_stored():
    idx = KvIndex(max_blocks=64)
    idx.stored("a", G2, range(64))
    idx.stored("a", G2, [0])  # stored again: now the most recent
    idx.stored("a", G2, [1000])
    assert len(idx) <= 64 and idx.evicted_blocks >= 1
    assert idx.tiers_of(0) == {"a": G2} and idx.tiers_of(1) == {}  # the oldest went first
    assert idx.memory_bytes() > 64 * 16


def test_match_agrees_with_a_naive_walk_on_random_fleets():
    rng = random.Random(7)
    for _ in range(50):
        idx = KvIndex()
        truth: dict[tuple[str, int], set[KvTier]] = {}
        workers = [f"w{i}" for i in range(rng.randint(1, 12))]
        keys = list(range(40))
        for _ in range(60):
            w, t = rng.choice(workers), rng.choice([G1, G2, G3])
            chosen = rng.sample(keys, rng.randint(1, 10))
            if rng.random() < 0.7:
                idx.stored(w, t, chosen)
                for k in chosen:
                    truth.setdefault((w, k), set()).add(t)
            else:
                idx.removed(w, t, chosen)
                for k in chosen:
                    truth.get((w, k), set()).discard(t)
        prompt = rng.sample(keys, 20)
        got = idx.match(prompt)
        for w in idx.workers:
            want = [0, 0, 0]
            for k in prompt:
                tiers = truth.get((w, k))
                if not tiers:
                    break
                want[min(t.rank for t in tiers)] += 1
            assert got[w] == PrefixMatch(*want), w
