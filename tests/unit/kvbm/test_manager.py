"""Leader + store policies, integrity, persistence and metrics, on real files and real tensors."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from kvbm_helpers import G1, LAYOUT, expected_bytes, keys_for, load, settings, store
from prometheus_client import generate_latest

from dynkv.kvbm.counters import Count
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.journal import JOURNAL_FILE
from dynkv.kvbm.manager import BlockManager, Tier


@pytest.fixture
def g1():
    return G1()


@pytest.fixture
def disk_dir(tmp_path):
    return tmp_path / "g3"


def g2(n=8, **kw):
    return BlockManager(LAYOUT, settings(cpu_cache_override_num_blocks=n, **kw))


def g2g3(disk_dir, host=8, disk=16, **kw):
    return BlockManager(
        LAYOUT,
        settings(
            cpu_cache_override_num_blocks=host,
            disk_cache_override_num_blocks=disk,
            disk_cache_dir=disk_dir,
            **kw,
        ),
    )


def g3(disk_dir, disk=16, **kw):
    return BlockManager(
        LAYOUT, settings(disk_cache_override_num_blocks=disk, disk_cache_dir=disk_dir, **kw)
    )


def test_no_tier_is_a_clear_error():
    with pytest.raises(KvbmConfigError, match="no KVBM tier"):
        BlockManager(LAYOUT, settings())


def test_sizing_in_decimal_gb():
    m = BlockManager(LAYOUT, settings(cpu_cache_gb=0.0001))  # 100,000 bytes
    assert m.stats()["host_blocks_total"] == 100_000 // LAYOUT.bytes_per_block
    m.close()


def test_write_through_to_host_and_byte_exact_load(g1):
    m = g2()
    keys = keys_for(5)
    assert store(m, g1, keys) == 5
    assert m.match(keys).tiers == (Tier.HOST,) * 5
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    assert store(m, g1, keys) == 0  # already held: touched, not copied again
    assert m.metrics.value(Count.OFFLOAD_D2H) == 5
    assert m.metrics.value(Count.ONBOARD_H2D) == 5
    m.close()


def test_prefix_lookup_stops_at_first_missing_block(g1):
    m = g2()
    keys = keys_for(6)
    store(m, g1, keys[:2] + keys[3:])
    assert m.match(keys).blocks == 2
    m.close()


def test_load_of_blocks_not_held_reports_them_failed(g1):
    m = g2()
    keys = keys_for(4)
    store(m, g1, keys[:2])
    failed, data = load(m, g1, keys, first_block=40)
    assert failed == [42, 43] and data[:2] == [expected_bytes(k) for k in keys[:2]]
    m.close()


def test_lru_eviction_within_host(g1):
    m = g2(n=4)
    a, b = keys_for(4), keys_for(2, salt="b")
    store(m, g1, a)
    load(m, g1, a[:1])  # a[0] becomes most recently used
    store(m, g1, b, first_block=10)  # evicts a[1], a[2]
    assert m.match(a).blocks == 1 and m.match([a[3]]).blocks == 1 and m.match(b).blocks == 2
    m.close()


def test_filter_sends_only_reused_blocks_to_disk(g1, disk_dir):
    m = g2g3(disk_dir)
    keys = keys_for(3)
    store(m, g1, keys)
    m.flush()
    assert m.stats()["disk_blocks_used"] == 0  # seen once: stays off the SSD
    load(m, g1, keys[:2])  # a hit doubles the frequency to 2 → offloaded
    m.flush()
    assert m.stats()["disk_blocks_used"] == 2
    assert m.metrics.value(Count.OFFLOAD_H2D) == 2
    assert m.stats()["offloads_in_flight"] == 0  # G2 slots released once written
    m.close()


def test_disabled_filter_writes_every_block_through(g1, disk_dir):
    m = g2g3(disk_dir, disable_disk_offload_filter=True)
    store(m, g1, keys_for(3))
    m.flush()
    assert m.stats()["disk_blocks_used"] == 3 and m.leader.filter is None
    m.close()


def test_disk_only_is_direct_and_unfiltered(g1, disk_dir):
    m = g3(disk_dir)
    keys = keys_for(4)
    store(m, g1, keys)
    m.flush()
    assert m.leader.filter is None and m.stats()["disk_blocks_used"] == 4
    assert m.metrics.value(Count.OFFLOAD_D2D) == 4
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    assert m.metrics.value(Count.ONBOARD_D2D) == 4
    m.close()


def test_disk_hits_are_promoted_to_host(g1, disk_dir):
    m = g2g3(disk_dir, host=4, disable_disk_offload_filter=True)
    first, second = keys_for(4), keys_for(4, salt="x")
    store(m, g1, first)
    m.flush()
    store(m, g1, second, first_block=10)  # pushes `first` out of G2; it stays on disk
    m.flush()
    assert m.match(first).tiers == (Tier.DISK,) * 4
    failed, data = load(m, g1, first)
    assert failed == [] and data == [expected_bytes(k) for k in first]
    assert m.match(first).tiers == (Tier.HOST,) * 4
    m.close()


def test_host_corruption_is_a_miss_counted_and_freed(g1):
    m = g2(host_verify="always")
    keys = keys_for(3)
    store(m, g1, keys)
    slot = m.leader.host.slot_of(keys[1])
    m.store.host.array[slot, 10] ^= 0xFF
    failed, data = load(m, g1, keys, first_block=40)
    assert failed == [41] and data[0] == expected_bytes(keys[0]) and data[2] is not None
    assert m.metrics.value(Count.INTEGRITY_FAILURES) == 1
    assert m.match(keys).blocks == 1  # the bad block is gone
    assert m.leader.host.free_count == 8 - 2  # and its slot is free again
    m.close()


def test_flipped_byte_in_the_disk_file_is_a_miss(g1, disk_dir, caplog):
    m = g3(disk_dir)
    keys = keys_for(3)
    store(m, g1, keys)
    m.flush()
    slot = m.leader.disk.slot_of(keys[0])
    m.close()
    with open(disk_dir / "blocks.bin", "r+b") as fh:
        fh.seek(slot * LAYOUT.slot_stride + 100)
        byte = fh.read(1)
        fh.seek(slot * LAYOUT.slot_stride + 100)
        fh.write(bytes([byte[0] ^ 0x01]))
    m = g3(disk_dir)
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        failed, _ = load(m, g1, keys, first_block=40)
    assert failed == [40]
    assert m.metrics.value(Count.INTEGRITY_FAILURES) == 1
    assert sum("failed its checksum" in r.message for r in caplog.records) == 1
    assert m.match(keys).blocks == 0
    m.close()
    m = g3(disk_dir)  # the journal forgot it too: a restart does not offer it again
    assert m.match(keys).blocks == 0 and m.match(keys[1:]).blocks == 2
    m.close()


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from kvbm_helpers import G1, LAYOUT, keys_for, load, settings, expected_bytes
from dynkv.kvbm.manager import BlockManager
m = BlockManager(LAYOUT, settings(disk_cache_override_num_blocks=16, disk_cache_dir={disk!r}))
keys = keys_for(5)
print("hits", m.match(keys).blocks)
failed, data = load(m, G1(), keys)
assert failed == [], failed
assert data == [expected_bytes(k) for k in keys]
m.close()
"""


def test_disk_pool_survives_restart_in_another_process(g1, disk_dir):
    m = g3(disk_dir)
    store(m, g1, keys_for(5))
    m.close()
    tests = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=tests, disk=str(disk_dir))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hits 5" in proc.stdout


def test_other_fingerprint_discards_with_one_log_line(g1, disk_dir, caplog):
    m = g3(disk_dir)
    store(m, g1, keys_for(3))
    m.close()
    other = replace(LAYOUT, model="another-model")
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        m2 = BlockManager(
            other, settings(disk_cache_override_num_blocks=16, disk_cache_dir=disk_dir)
        )
    assert m2.stats()["disk_blocks_used"] == 0
    lines = [r.message for r in caplog.records if "discarding" in r.message]
    assert len(lines) == 1 and "3 blocks" in lines[0]
    m2.close()


def test_torn_journal_tail_is_ignored(g1, disk_dir):
    m = g3(disk_dir)
    keys = keys_for(4)
    store(m, g1, keys)
    m.close()
    journal = disk_dir / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-20])  # the last record torn in half
    m = g3(disk_dir)
    # writes finish in any order: exactly the block journaled last is gone
    assert sum(k in m.leader.disk for k in keys) == 3
    m.close()


def test_private_modes_and_exclusive_directory(disk_dir):
    m = g3(disk_dir)
    assert stat.S_IMODE(disk_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((disk_dir / "blocks.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((disk_dir / JOURNAL_FILE).stat().st_mode) == 0o600
    with pytest.raises(KvbmConfigError, match="in use by another process"):
        g3(disk_dir)
    m.close()


def test_metrics_names_and_hit_rate_line(g1):
    m = g2()
    keys = keys_for(4)
    m.record_lookup(4, m.match(keys))
    store(m, g1, keys)
    m.record_lookup(4, m.match(keys))
    assert m.metrics.hit_rates().line() == "Cache Hit Rates - Host: 50.0% (4/8), Disk: 0.0% (0/8)"
    assert m.metrics.log_if_changed() is not None and m.metrics.log_if_changed() is None
    text = generate_latest(m.metrics.registry).decode()
    for name in (
        "kvbm_matched_tokens_total",
        "kvbm_offload_blocks_d2h_total 4.0",
        "kvbm_offload_blocks_h2d_total",
        "kvbm_offload_blocks_d2d_total",
        "kvbm_onboard_blocks_h2d_total",
        "kvbm_onboard_blocks_d2d_total",
        "kvbm_integrity_failures_total",
        "kvbm_host_cache_hit_rate 0.5",
        "kvbm_disk_cache_hit_rate 0.0",
        "kvbm_host_blocks_used 4.0",
        "kvbm_host_blocks_total 8.0",
        'kvbm_transfer_seconds_count{direction="device_to_host"} 1.0',
    ):
        assert name in text, name
    m.close()


def test_pinning_failure_falls_back_with_one_warning(g1, caplog):
    # torch built for CPU cannot pin memory: exactly the memlock-failure path
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        m = BlockManager(LAYOUT, settings(cpu_cache_override_num_blocks=4), pin_memory=True)
    warnings = [r.message for r in caplog.records if "pinning" in r.message]
    assert len(warnings) == 1 and "ulimit -l" in warnings[0]
    assert not m.store.host.pinned
    store(m, g1, keys_for(2))
    assert m.match(keys_for(2)).blocks == 2
    m.close()


def test_busy_host_tier_sends_qualified_blocks_straight_to_disk(g1, disk_dir):
    m = g2g3(disk_dir, host=2, disk=8, disable_disk_offload_filter=True)
    keys = keys_for(5)
    store(m, g1, keys)  # 2 via G2 (pinned while written), 3 directly G1→G3
    m.flush()
    assert m.stats()["disk_blocks_used"] == 5
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    m.close()


def test_full_pool_drops_instead_of_blocking(disk_dir):
    m = g2g3(disk_dir, host=2, disk=4)
    # both G2 slots get a disk write in flight: they stay pinned until the store reports back
    m.leader.plan_store(keys_for(2), [0, 1])  # first sighting: G2 only
    stores, offloads = m.leader.plan_store(keys_for(2), [0, 1])  # second: earned disk
    m.leader.end_step()
    assert stores == [] and len(offloads) == 2
    stores, _ = m.leader.plan_store(keys_for(1, salt="z"), [5])  # first sighting, G2 full
    assert stores == [] and m.metrics.value(Count.OFFLOAD_DROPPED) == 1
    # once the writes are reported done, the slots are evictable again
    from dynkv.kvbm.ops import StoreReport

    m.leader.apply_report(StoreReport(offloads_done=[op.host_slot for op in offloads]))
    stores, _ = m.leader.plan_store(keys_for(1, salt="z"), [5])
    assert len(stores) == 1
    m.leader.end_step()
    m.store.close()


def test_journal_slots_outside_the_pool_are_ignored_on_replay(tmp_path, caplog):
    """A journal whose records check out but name slots past the pool (corrupt, or written by
    hand) must not make the store index outside its arrays: those records are skipped."""
    from dynkv.kvbm.journal import Journal

    directory = tmp_path / "g3"
    m = BlockManager(LAYOUT, settings(disk_cache_override_num_blocks=4, disk_cache_dir=directory))
    g1 = G1()
    keys = keys_for(2)
    store(m, g1, keys)
    m.close()
    journal = Journal(directory, LAYOUT.fingerprint(), LAYOUT.slot_stride, 4)
    entries = journal.open()
    journal.put(keys_for(1, salt="forged")[0], 4, 123)  # slot 4 of a 4-slot pool
    journal.put(keys_for(1, salt="forged2")[0], 2**31, 456)
    journal.close()
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        assert Journal(directory, LAYOUT.fingerprint(), LAYOUT.slot_stride, 4).open() == entries
    assert any("outside its 4-slot pool" in r.getMessage() for r in caplog.records)
    m = BlockManager(LAYOUT, settings(disk_cache_override_num_blocks=4, disk_cache_dir=directory))
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    m.close()


def test_a_load_from_host_and_disk_at_once_in_small_chunks(g1, disk_dir, monkeypatch):
    """One load mixing G2 hits and G3 hits, fetched three blocks at a time: every block
    arrives, and what was promoted serves later loads from G2."""
    from dynkv.kvbm import store as store_module

    monkeypatch.setattr(store_module, "LOAD_CHUNK_BYTES", 3 * LAYOUT.slot_stride)
    m = g2g3(disk_dir, host=4, disable_disk_offload_filter=True)
    first, second = keys_for(4), keys_for(4, salt="x")
    store(m, g1, first)
    m.flush()
    store(m, g1, second, first_block=10)  # `first` now only on disk, `second` in G2
    m.flush()
    keys = second[:2] + first
    assert m.match(keys).tiers == (Tier.HOST,) * 2 + (Tier.DISK,) * 4
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    assert m.metrics.value(Count.ONBOARD_D2D) == 4
    assert Tier.HOST in m.match(first).tiers  # promoted (G2 holds 4: the rest read via staging)
    failed, data = load(m, g1, first, first_block=40)
    assert failed == [] and data == [expected_bytes(k) for k in first]
    m.close()


@pytest.mark.parametrize(("blocks", "verified"), [(16, 2), (3, 1), (1, 1)])
def test_sampled_host_verification_checks_one_block_in_eight(g1, blocks, verified):
    """G2 is verified on a sample (the default): every block of the pool corrupted, a load
    fails exactly the sampled ones — at least one per load — and loads the others."""
    m = g2(n=16)
    keys = keys_for(blocks)
    store(m, g1, keys)
    m.store.host.array[:, 10] ^= 0xFF
    failed, _ = load(m, g1, keys, first_block=40)
    assert len(failed) == verified
    assert m.metrics.value(Count.INTEGRITY_FAILURES) == verified
    m.close()
