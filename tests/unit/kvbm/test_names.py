"""The names other code reads: counters (dashboards, `status`, `bench`), tiers and roles."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dynkv.kvbm.counters import Count
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.kvbm.ops import StoreReport, Tier
from dynkv.kvbm.roles import Role

# Exactly what was exposed before the counters became an enum, plus the disk read deadline's
# misses, the lookup/hit counters that hit rates are aggregated from, and the eviction/reuse
# counters `dynkv advise` reads.
EXPOSED = {
    "kvbm_matched_tokens_total",
    "kvbm_offload_blocks_d2h_total",
    "kvbm_offload_blocks_h2d_total",
    "kvbm_offload_blocks_d2d_total",
    "kvbm_onboard_blocks_h2d_total",
    "kvbm_onboard_blocks_d2d_total",
    "kvbm_integrity_failures_total",
    "kvbm_load_failures_total",
    "kvbm_offload_dropped_blocks_total",
    "kvbm_store_discarded_blocks_total",  # a step whose load failed keeps none of its KV
    "kvbm_disk_journal_failures_total",
    "kvbm_handoff_blocks_sent_total",
    "kvbm_handoff_blocks_received_total",
    "kvbm_handoff_blocks_missed_total",
    "kvbm_disk_read_timeouts_total",
    "kvbm_lookup_blocks_total",
    "kvbm_host_hit_blocks_total",
    "kvbm_disk_hit_blocks_total",
    # G2 pressure and the SSD filter, for `dynkv advise`
    "kvbm_host_evicted_blocks_total",
    "kvbm_host_evicted_unused_blocks_total",
    "kvbm_reuse_after_evict_disk_blocks_total",
    "kvbm_reuse_after_evict_recomputed_blocks_total",
    "kvbm_disk_filter_starved_blocks_total",
    "kvbm_disk_evicted_blocks_total",
    # the onboard policy (docs/onboard-policy.md); `dynkv advise` reads them
    "kvbm_onboard_skipped_blocks_total",
    "kvbm_prefill_seconds_saved_total",
}


def test_every_counter_is_exposed_under_its_name():
    metrics = KvbmMetrics()
    plain = [c for c in Count if not c.labels]
    for i, counter in enumerate(plain, start=1):
        metrics.count(counter, i)
    text = generate_latest(metrics.registry).decode()
    assert {c.sample for c in Count} == EXPOSED
    for i, counter in enumerate(plain, start=1):
        assert f"\n{counter.sample} {float(i)}\n" in text
        assert metrics.value(counter) == i


def test_skipped_blocks_carry_tier_and_reason():
    metrics = KvbmMetrics()
    skipped = Count.ONBOARD_SKIPPED
    assert skipped.labels == ("tier", "reason")
    metrics.count(skipped, 3, tier="disk", reason="slower_than_recompute")
    metrics.count(skipped, 2, tier="disk", reason="queue_full")
    metrics.count(skipped, 1, tier="host", reason="slower_than_recompute")
    text = generate_latest(metrics.registry).decode()
    assert 'kvbm_onboard_skipped_blocks_total{reason="queue_full",tier="disk"} 2.0' in text
    assert metrics.value(skipped, tier="disk") == 5
    assert metrics.value(skipped, tier="disk", reason="queue_full") == 2
    assert metrics.value(skipped) == 6


def test_a_misspelt_counter_fails_where_it_is_written():
    report = StoreReport()
    with pytest.raises(AttributeError):
        report.count(Count.ONBOARD_H2X)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        report.count("onboard_h2d")  # type: ignore[arg-type]


def test_reports_merge_by_counter():
    a, b = StoreReport(), StoreReport()
    a.count(Count.ONBOARD_H2D, 2)
    b.count(Count.ONBOARD_H2D, 3)
    b.count(Count.HANDOFF_SENT)
    assert a.merge(b).counts == {Count.ONBOARD_H2D: 5, Count.HANDOFF_SENT: 1}


def test_tier_and_role_values_are_the_strings_on_the_wire():
    assert [t.value for t in Tier] == ["host", "disk", "handoff"]
    assert [r.value for r in Role] == ["agg", "prefill", "decode"]
    assert Role("prefill") is Role.PREFILL and Role.DECODE == "decode"


def test_a_report_survives_the_trip_between_vllm_processes():
    import pickle

    report = StoreReport()
    report.count(Count.HANDOFF_MISSED, 2)
    report.failures.append((Tier.HANDOFF, 3, 7))
    back = pickle.loads(pickle.dumps(report))
    assert back.counts == {Count.HANDOFF_MISSED: 2} and back.failures == [(Tier.HANDOFF, 3, 7)]
    assert next(iter(back.counts)) is Count.HANDOFF_MISSED
