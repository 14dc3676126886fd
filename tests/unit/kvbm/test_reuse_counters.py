"""The eviction and reuse-after-eviction counters `dynkv advise` reads, on a real manager."""

from __future__ import annotations

import pytest
from kvbm_helpers import G1, LAYOUT, keys_for, load, settings, store

from dynkv.kvbm.counters import Count
from dynkv.kvbm.manager import BlockManager
from dynkv.kvbm.reuse import ReuseTracker


def counts(m: BlockManager) -> dict[str, float]:
    return {c.name: m.metrics.value(c) for c in Count}


@pytest.fixture
def g1():
    return G1()


def test_tracker_ghosts_are_bounded_and_consumed_once():
    t = ReuseTracker(2)
    t.hit(1)
    assert not t.evicted(1, filtered=False).unused
    assert t.evicted(2, filtered=True).unused
    t.evicted(3, filtered=False)  # pushes 1 out of a ghost list of 2
    assert t.reused(1) is None
    assert t.reused(2) == t.evicted(9, filtered=True) and t.reused(2) is None


def test_g2_thrash_counts_evictions_unused_and_recomputed_reuse(g1):
    m = BlockManager(LAYOUT, settings(cpu_cache_override_num_blocks=4))
    try:
        a, b = keys_for(4, "a"), keys_for(4, "b")
        store(m, g1, a)
        store(m, g1, b)  # evicts all of a, never reused
        c = counts(m)
        assert c["HOST_EVICTED"] == 4 and c["HOST_EVICTED_UNUSED"] == 4
        store(m, g1, a)  # a again: recomputed reuse after eviction (b goes)
        c = counts(m)
        assert c["REUSE_AFTER_EVICT_RECOMPUTED"] == 4
        assert c["FILTER_STARVED"] == 0  # no G3, no filter
        failed, _ = load(m, g1, a)
        assert failed == []
        store(m, g1, b)  # evicts a, which G2 served: evicted but not unused
        assert counts(m)["HOST_EVICTED_UNUSED"] == 8
        assert counts(m)["HOST_EVICTED"] == 12
    finally:
        m.close()


def test_working_set_within_g2_counts_nothing(g1):
    m = BlockManager(LAYOUT, settings(cpu_cache_override_num_blocks=8))
    try:
        a = keys_for(4, "a")
        store(m, g1, a)
        for _ in range(3):
            assert load(m, g1, a)[0] == []
        c = counts(m)
        assert c["HOST_EVICTED"] == c["REUSE_AFTER_EVICT_RECOMPUTED"] == 0
    finally:
        m.close()


def g2g3(tmp_path, **kw) -> BlockManager:
    return BlockManager(
        LAYOUT,
        settings(
            cpu_cache_override_num_blocks=4,
            disk_cache_override_num_blocks=16,
            disk_cache_dir=tmp_path / "g3",
            **kw,
        ),
    )


def test_filter_starves_g3_when_reuse_comes_only_after_eviction(g1, tmp_path):
    m = g2g3(tmp_path)
    try:
        a, b = keys_for(4, "a"), keys_for(4, "b")
        store(m, g1, a)
        store(m, g1, b)  # a leaves G2 seen once: the filter kept it off G3
        m.flush()
        store(m, g1, a)  # recomputed
        m.flush()
        c = counts(m)
        assert c["REUSE_AFTER_EVICT_RECOMPUTED"] == 4 and c["FILTER_STARVED"] == 4
        assert c["DISK_HIT_BLOCKS"] == 0
    finally:
        m.close()


def test_without_the_filter_g3_serves_the_reuse(g1, tmp_path):
    m = g2g3(tmp_path, disable_disk_offload_filter=True)
    try:
        a, b = keys_for(4, "a"), keys_for(4, "b")
        store(m, g1, a)
        m.flush()
        store(m, g1, b)
        m.flush()
        failed, _ = load(m, g1, a)  # from G3
        m.flush()
        assert failed == []
        c = counts(m)
        assert c["REUSE_AFTER_EVICT_DISK"] == 4
        assert c["FILTER_STARVED"] == 0 and c["REUSE_AFTER_EVICT_RECOMPUTED"] == 0
    finally:
        m.close()


def test_g3_evictions_are_counted(g1, tmp_path):
    m = BlockManager(
        LAYOUT,
        settings(disk_cache_override_num_blocks=4, disk_cache_dir=tmp_path / "g3"),
    )
    try:
        store(m, g1, keys_for(4, "a"))
        m.flush()
        store(m, g1, keys_for(4, "b"))
        m.flush()
        assert counts(m)["DISK_EVICTED"] == 4
    finally:
        m.close()
