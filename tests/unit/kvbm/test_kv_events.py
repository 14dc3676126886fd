"""KV events on the worker side: the wire schema, the leader's hook, the publisher's batching
(without NATS; the NATS round trip is tests/integration/test_kv_events_nats.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.event_publisher import KvEventPublisher, KvEventsSettings, start_from_env
from dynkv.kvbm.events import (
    Cleared,
    EventBatch,
    KvTier,
    Removed,
    Stored,
    WorkerRates,
    events_subject,
    events_wildcard,
    parse_message,
    snapshot_subject,
)
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.leader import BlockLeader
from dynkv.kvbm.ops import StoreReport, Tier
from dynkv.kvbm.slots import SlotIndex

BIG = (1 << 128) - 3


def settings(**kw) -> KvEventsSettings:
    return KvEventsSettings(nats_url="nats://127.0.0.1:1", deployment="d", worker_id="w0", **kw)


def test_a_batch_round_trips_with_all_128_bits_of_its_keys():
    batch = EventBatch(
        worker_id="agg-0",
        instance_id="i",
        seq=3,
        ts=1.5,
        block_size=32,
        events=[
            Stored(tier=KvTier.HOST, keys=[BIG, 1], parent=7),
            Removed(tier=KvTier.DISK, keys=[2]),
            Cleared(),
        ],
    )
    wire = batch.model_dump_json()
    assert f'"{BIG:032x}"' in wire  # hex: every JSON reader keeps the 128 bits
    assert parse_message(wire.encode()) == batch


def test_rates_and_events_share_one_subject_and_are_told_apart():
    rates = WorkerRates(
        worker_id="w", instance_id="i", seq=0, ts=0, block_size=16, g2_to_g1_tokens_per_s=5.0
    )
    assert parse_message(rates.model_dump_json().encode()) == rates
    with pytest.raises(ValidationError):
        parse_message(b'{"type":"stored","tier":"g2","keys":[]}')
    with pytest.raises(ValidationError):
        parse_message(
            b'{"type":"events","worker_id":"w","instance_id":"i","seq":0,"ts":0,'
            b'"block_size":16,"events":[]}'
        )  # batches count from 1


def test_subjects_and_their_tokens():
    assert events_subject("demo", "agg-0") == "dynkv.demo.kv.agg-0"
    assert snapshot_subject("demo", "agg-0") == "dynkv.demo.kv.agg-0.snapshot"
    assert events_wildcard("demo") == "dynkv.demo.kv.*"
    assert events_subject("prod.eu", "agg-0") == "dynkv.prod~eu.kv.agg-0"  # names may have dots
    for bad in ("*", ">", "", "a b"):
        with pytest.raises(ValueError, match="subject token"):
            events_subject(bad, "w")


def test_the_slot_index_reports_stores_evictions_and_removals():
    seen: list[tuple[str, int]] = []
    index = SlotIndex(2)
    slot, _ = index.reserve()
    index.publish(slot, 10)
    index.watch(lambda k: seen.append(("+", k)), lambda k: seen.append(("-", k)))
    assert seen == [("+", 10)]  # what it held already
    slot, _ = index.reserve()
    index.publish(slot, 11)
    slot, evicted = index.reserve()  # full: evicts the LRU block
    assert evicted == 10
    index.publish(slot, 12)
    index.remove(11)
    index.remove(99)  # not held: nothing to report
    assert seen == [("+", 10), ("+", 11), ("-", 10), ("+", 12), ("-", 11)]


class Sink:
    def __init__(self) -> None:
        self.log: list[tuple[str, Tier, int]] = []

    def stored(self, tier: Tier, key: int) -> None:
        self.log.append(("+", tier, key))

    def removed(self, tier: Tier, key: int) -> None:
        self.log.append(("-", tier, key))


def test_the_leader_reports_g2_and_g3_changes_including_restored_disk_blocks():
    layout = BlockLayout(
        model="m", dtype="float32", block_size=4, num_layers=1, bytes_per_layer_block=64
    )
    kvbm = KvbmSettings(
        cpu_cache_override_num_blocks=2,
        disk_cache_override_num_blocks=4,
        disable_disk_offload_filter=True,
    )
    leader = BlockLeader(layout, kvbm, disk_entries=[(77, 0)])
    sink = Sink()
    leader.watch(sink)
    assert sink.log == [("+", Tier.DISK, 77)]
    leader.plan_store([1, 2], [0, 1])
    leader.end_step()
    assert sink.log[1:] == [
        ("+", Tier.HOST, 1),
        ("+", Tier.DISK, 1),
        ("+", Tier.HOST, 2),
        ("+", Tier.DISK, 2),
    ]
    leader.apply_report(StoreReport(failures=[(Tier.DISK, leader.disk.slot_of(2), 2)]))
    assert sink.log[-1] == ("-", Tier.DISK, 2)  # a failed disk write: the block is gone


def test_batches_are_cut_by_count_and_coalesce_runs_of_one_kind_and_tier():
    pub = KvEventPublisher(settings(batch_max=5), block_size=16)
    for k in (1, 2, 3):
        pub.stored(Tier.HOST, k)
    assert pub._queue.qsize() == 0
    pub.removed(Tier.HOST, 1)  # `cleared` + 4 changes: the batch is full
    assert pub._queue.qsize() == 1
    seq, ts, raw = pub._queue.get_nowait()
    batch = pub._batch(seq, ts, raw)
    assert batch.seq == 1
    assert batch.events == [
        Cleared(),
        Stored(tier=KvTier.HOST, keys=[1, 2, 3]),
        Removed(tier=KvTier.HOST, keys=[1]),
    ]
    pub.stored(Tier.DISK, 5)
    pub.stored(Tier.HOST, 6)
    pub.flush_pending()
    seq, ts, raw = pub._queue.get_nowait()
    batch = pub._batch(seq, ts, raw)
    assert batch.seq == 2
    assert batch.events == [Stored(tier=KvTier.DISK, keys=[5]), Stored(tier=KvTier.HOST, keys=[6])]
    pub.stored(Tier.HANDOFF, 9)  # the handoff pool is not a cache tier: never published
    pub.flush_pending()
    assert pub._queue.qsize() == 0


def test_a_full_queue_drops_batches_but_their_numbers_stay_used():
    pub = KvEventPublisher(settings(batch_max=1, queue_max=2), block_size=16)
    for k in range(5):
        pub.stored(Tier.HOST, k)
    assert pub._queue.qsize() == 2
    assert pub.dropped_batches == 3
    assert pub._seq == 5  # the router sees 1, 2, then a gap


def test_a_snapshot_is_the_key_set_at_the_last_batch_in_chunks():
    pub = KvEventPublisher(settings(), block_size=16)
    for k in range(5):
        pub.stored(Tier.HOST, k)
    pub.stored(Tier.DISK, 100)
    pub.removed(Tier.HOST, 0)
    chunks = pub.snapshot(max_keys=3)
    assert pub._seq == 1 and all(c.seq == 1 for c in chunks)  # pending changes were cut first
    assert [c.part for c in chunks] == [0, 1, 2] and {c.parts for c in chunks} == {3}
    held = {(c.tier, k) for c in chunks for k in c.keys}
    assert held == {(KvTier.HOST, k) for k in range(1, 5)} | {(KvTier.DISK, 100)}
    empty = KvEventPublisher(settings(), block_size=16).snapshot(10)
    assert [(c.tier, c.keys, c.parts) for c in empty] == [(None, [], 1)]


def test_no_nats_url_means_no_publisher(monkeypatch):
    monkeypatch.delenv("DYNKV_KV_EVENTS_NATS_URL", raising=False)
    assert start_from_env(object(), 16) is None
    monkeypatch.setenv("DYNKV_KV_EVENTS_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("DYNKV_KV_EVENTS_WORKER_ID", "bad.id")
    assert start_from_env(object(), 16) is None  # unusable settings: the engine serves on


def test_the_plan_env_names_match_the_settings(monkeypatch):
    env = KvEventsSettings.env(
        nats_url="nats://127.0.0.1:4222", deployment="demo", worker_id="agg-0"
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = KvEventsSettings()
    assert (s.nats_url, s.deployment, s.worker_id) == ("nats://127.0.0.1:4222", "demo", "agg-0")


def test_every_kv_events_setting_is_documented():
    from pathlib import Path

    page = Path(__file__).resolve().parents[3] / "docs" / "kv-events.md"
    rows = [line.split("|")[1] for line in page.read_text().splitlines() if line.startswith("|")]
    missing = [v for v in KvEventsSettings.env_names() if f"`{v}`" not in "\n".join(rows)]
    assert missing == []


def test_load_rates_come_from_the_runtimes_transfer_timings():
    from dynkv.kvbm.counters import Count
    from dynkv.kvbm.event_rates import metrics_rates
    from dynkv.kvbm.metrics import KvbmMetrics

    metrics = KvbmMetrics()
    read = metrics_rates(metrics, block_size=16)
    assert read().g2_to_g1_tokens_per_s is None  # nothing loaded yet: not measured
    metrics.count(Count.ONBOARD_H2D, 30)
    metrics.count(Count.ONBOARD_D2D, 10)
    metrics.transfer_seconds.labels("host_to_device").observe(0.04)  # 40 blocks: 1 ms each
    metrics.transfer_seconds.labels("disk_to_host").observe(0.03)  # 10 disk blocks: 3 ms each
    rates = read()
    assert rates.g2_to_g1_tokens_per_s == pytest.approx(16 / 0.001)
    assert rates.g3_to_g1_tokens_per_s == pytest.approx(16 / 0.004)
    assert rates.prefill == [] and rates.decode_seconds_per_request is None  # none passed in
    metrics.close()
