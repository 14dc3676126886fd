"""The block manager's policies, integrity, persistence and metrics, on real files."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from kvbm_helpers import LAYOUT, expected_bytes, keys_for, load, settings, store
from prometheus_client import generate_latest

from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.journal import JOURNAL_FILE
from dynkv.kvbm.manager import BlockManager, Tier


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
    # 0.0001 GB = 100,000 bytes; a block is 4096 bytes → 24 blocks
    m = BlockManager(LAYOUT, settings(cpu_cache_gb=0.0001))
    assert m.stats()["host_blocks_total"] == 100_000 // LAYOUT.bytes_per_block
    m.close()


def test_write_through_to_host_and_byte_exact_load():
    m = g2()
    keys = keys_for(5)
    assert store(m, keys) == keys
    assert m.match(keys).tiers == (Tier.HOST,) * 5
    result, data = load(m, keys)
    assert all(result.ok) and data == [expected_bytes(k) for k in keys]
    assert store(m, keys) == []  # already held: touched, not copied again
    assert m.metrics.offload_d2h._value.get() == 5
    assert m.metrics.onboard_h2d._value.get() == 5
    m.close()


def test_prefix_lookup_stops_at_first_missing_block():
    m = g2()
    keys = keys_for(6)
    store(m, keys[:2] + keys[3:])
    assert m.match(keys).blocks == 2
    m.close()


def test_lru_eviction_within_host():
    m = g2(n=4)
    a, b = keys_for(4), keys_for(2, salt="b")
    store(m, a)
    load(m, a[:1])  # a[0] becomes most recently used
    store(m, b)  # evicts a[1], a[2]
    assert m.match(a).blocks == 1 and m.match([a[3]]).blocks == 1 and m.match(b).blocks == 2
    m.close()


def test_filter_sends_only_reused_blocks_to_disk(disk_dir):
    m = g2g3(disk_dir)
    keys = keys_for(3)
    store(m, keys)
    m.flush()
    assert m.stats()["disk_blocks_used"] == 0  # seen once: stays off the SSD
    load(m, keys[:2])  # a hit doubles the frequency to 2 → offloaded
    m.flush()
    assert m.stats()["disk_blocks_used"] == 2
    assert m.metrics.offload_h2d._value.get() == 2
    m.close()


def test_disabled_filter_writes_every_block_through(disk_dir):
    m = g2g3(disk_dir, disable_disk_offload_filter=True)
    store(m, keys_for(3))
    m.flush()
    assert m.stats()["disk_blocks_used"] == 3 and m.filter is None
    m.close()


def test_disk_only_is_direct_and_unfiltered(disk_dir):
    m = g3(disk_dir)
    keys = keys_for(4)
    store(m, keys)
    m.flush()
    assert m.filter is None and m.stats()["disk_blocks_used"] == 4
    assert m.metrics.offload_d2d._value.get() == 4
    result, data = load(m, keys)
    assert all(result.ok) and result.sources == [Tier.DISK] * 4
    assert data == [expected_bytes(k) for k in keys]
    assert m.metrics.onboard_d2d._value.get() == 4
    m.close()


def test_disk_hits_are_promoted_to_host(disk_dir):
    m = g2g3(disk_dir, host=4, disable_disk_offload_filter=True)
    first, second = keys_for(4), keys_for(4, salt="x")
    store(m, first)
    m.flush()
    store(m, second)  # pushes `first` out of G2; it stays on disk
    m.flush()
    assert m.match(first).tiers == (Tier.DISK,) * 4
    result, data = load(m, first)
    assert all(result.ok) and data == [expected_bytes(k) for k in first]
    assert m.match(first).tiers == (Tier.HOST,) * 4
    m.close()


def test_host_corruption_is_a_miss_counted_and_freed():
    m = g2()
    keys = keys_for(3)
    store(m, keys)
    slot = m.host.index.slot_of(keys[1])
    m.host.array[slot, 10] ^= 0xFF
    result, data = load(m, keys)
    assert result.ok == [True, False, True] and data[1] is None
    assert m.metrics.integrity_failures._value.get() == 1
    assert m.match(keys).blocks == 1  # the bad block is gone, its slot free again
    assert m.host.index.free_count == 8 - 2
    m.close()


def test_flipped_byte_in_the_disk_file_is_a_miss(disk_dir, caplog):
    m = g3(disk_dir)
    keys = keys_for(3)
    store(m, keys)
    m.flush()
    slot = m.disk.index.slot_of(keys[0])
    m.close()
    with open(disk_dir / "blocks.bin", "r+b") as fh:
        fh.seek(slot * LAYOUT.slot_stride + 100)
        byte = fh.read(1)
        fh.seek(slot * LAYOUT.slot_stride + 100)
        fh.write(bytes([byte[0] ^ 0x01]))
    m = g3(disk_dir)
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        result, _ = load(m, keys)
        load(m, keys[:1])  # already dropped: no second log line for the same block
    assert result.ok == [False, True, True]
    assert m.metrics.integrity_failures._value.get() == 1
    assert sum("failed its checksum" in r.message for r in caplog.records) == 1
    assert m.match(keys).blocks == 0
    m.close()


def test_disk_pool_survives_restart_in_another_process(disk_dir):
    m = g3(disk_dir)
    keys = keys_for(5)
    store(m, keys)
    m.close()
    child = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from kvbm_helpers import LAYOUT, keys_for, load, settings, expected_bytes
from dynkv.kvbm.manager import BlockManager
m = BlockManager(LAYOUT, settings(disk_cache_override_num_blocks=16, disk_cache_dir={str(disk_dir)!r}))
keys = keys_for(5)
result, data = load(m, keys)
assert all(result.ok), result.ok
assert data == [expected_bytes(k) for k in keys]
print("hits", m.match(keys).blocks)
m.close()
"""
    proc = subprocess.run(
        [sys.executable, "-c", child.replace("\n    ", "\n")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hits 5" in proc.stdout


def test_other_fingerprint_discards_with_one_log_line(disk_dir, caplog):
    m = g3(disk_dir)
    store(m, keys_for(3))
    m.close()
    from dataclasses import replace

    other = replace(LAYOUT, model="another-model")
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        m2 = BlockManager(
            other, settings(disk_cache_override_num_blocks=16, disk_cache_dir=disk_dir)
        )
    assert m2.stats()["disk_blocks_used"] == 0
    lines = [r.message for r in caplog.records if "discarding" in r.message]
    assert len(lines) == 1 and "3 blocks" in lines[0]
    m2.close()


def test_torn_journal_tail_is_ignored(disk_dir):
    m = g3(disk_dir)
    keys = keys_for(4)
    store(m, keys)
    m.close()
    journal = disk_dir / JOURNAL_FILE
    data = journal.read_bytes()
    journal.write_bytes(data[:-20])  # the last record torn in half
    m = g3(disk_dir)
    assert m.match(keys[:3]).blocks == 3 and keys[3] not in m.disk.index
    m.close()


def test_private_modes_and_exclusive_directory(disk_dir):
    m = g3(disk_dir)
    assert stat.S_IMODE(disk_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((disk_dir / "blocks.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((disk_dir / JOURNAL_FILE).stat().st_mode) == 0o600
    with pytest.raises(KvbmConfigError, match="in use by another process"):
        g3(disk_dir)
    m.close()


def test_metrics_names_and_hit_rate_line():
    m = g2()
    keys = keys_for(4)
    m.record_lookup(4, m.match(keys))
    store(m, keys)
    m.record_lookup(4, m.match(keys))
    assert m.metrics.hit_rates().line() == "Cache Hit Rates - Host: 50.0% (4/8), Disk: 0.0% (0/8)"
    assert m.metrics.log_if_changed() is not None and m.metrics.log_if_changed() is None
    text = generate_latest(m.metrics.registry).decode()
    for name in (
        "kvbm_matched_tokens_total",
        "kvbm_offload_blocks_d2h_total",
        "kvbm_offload_blocks_h2d_total",
        "kvbm_offload_blocks_d2d_total",
        "kvbm_onboard_blocks_h2d_total",
        "kvbm_onboard_blocks_d2d_total",
        "kvbm_integrity_failures_total",
        "kvbm_host_cache_hit_rate 0.5",
        "kvbm_disk_cache_hit_rate 0.0",
        "kvbm_host_blocks_used 4.0",
        "kvbm_host_blocks_total 8.0",
        "kvbm_transfer_seconds",
    ):
        assert name in text, name
    m.close()


def test_pinning_failure_falls_back_with_one_warning(caplog):
    # torch built for CPU cannot pin memory: exactly the memlock-failure path
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        m = BlockManager(LAYOUT, settings(cpu_cache_override_num_blocks=4), pin_memory=True)
    warnings = [r.message for r in caplog.records if "pinning" in r.message]
    assert len(warnings) == 1 and "ulimit -l" in warnings[0]
    assert not m.host.memory.pinned
    store(m, keys_for(2))
    assert m.match(keys_for(2)).blocks == 2
    m.close()
