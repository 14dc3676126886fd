"""A disk tier without G2 stages its writes in rows it reuses (`dynkv.kvbm.write_staging`,
docs/kvbm.md#g3-without-g2): a store lands in memory earlier stores committed instead of a fresh
mapping whose every page the kernel commits inside the request's step; rows come back only when
their write completed, and a store finding none free drops what does not fit (counted)."""

from __future__ import annotations

import threading

from kvbm_helpers import G1, LAYOUT, expected_bytes, keys_for, load, settings, store

import dynkv.kvbm.disk_tier as disk_tier
from dynkv.kvbm.counters import Count
from dynkv.kvbm.manager import BlockManager
from dynkv.kvbm.write_staging import WriteStaging


def g3(tmp_path) -> BlockManager:
    return BlockManager(
        LAYOUT, settings(disk_cache_override_num_blocks=64, disk_cache_dir=tmp_path / "g3")
    )


def test_rows_are_handed_out_lowest_first_and_come_back():
    rows = WriteStaging(10 * 4096, 4096)
    assert rows.capacity == 10
    first = rows.take(4)
    assert first == [0, 1, 2, 3]
    assert rows.take(8) == [4, 5, 6, 7, 8, 9]  # fewer than asked: the capacity is a bound
    assert rows.take(1) == []
    rows.give_back(reversed(first))
    assert rows.take(3) == [0, 1, 2] and rows.free == 1


def test_the_mapping_is_made_at_the_first_store_only(tmp_path):
    m = g3(tmp_path)
    handler = m.store._disk
    assert handler.write_staging._array is None  # a worker that never stores maps nothing
    g1 = G1()
    store(m, g1, keys_for(4))
    assert handler.write_staging._array is not None
    m.close()


def test_each_store_reuses_the_rows_the_last_one_committed(tmp_path, monkeypatch):
    m = g3(tmp_path)
    handler = m.store._disk
    taken: list[list[int]] = []
    take = handler.write_staging.take
    monkeypatch.setattr(handler.write_staging, "take", lambda n: taken.append(take(n)) or taken[-1])
    g1 = G1()
    first, second = keys_for(8), keys_for(8, salt="second")
    assert store(m, g1, first) == 8
    m.flush()
    assert store(m, g1, second, first_block=8) == 8
    m.flush()
    assert taken == [list(range(8)), list(range(8))]
    assert handler.write_staging.free == handler.write_staging.capacity
    for keys in (first, second):  # what reached the disk is what was staged
        failed, data = load(m, g1, keys)
        assert failed == [] and data == [expected_bytes(k) for k in keys]
    m.close()


def test_rows_held_by_pending_writes_bound_a_store(tmp_path, monkeypatch):
    capacity = 4
    monkeypatch.setattr(disk_tier, "MAX_STAGED_BYTES", capacity * LAYOUT.slot_stride)
    m = g3(tmp_path)
    pool = m.store._disk.pool
    release = threading.Event()
    write_run = pool.write_run

    def held(first_slot, bufs, after=()):  # the disk does not finish until released
        fut = pool._pool.submit(release.wait)
        return write_run(first_slot, bufs, [*after, fut])

    monkeypatch.setattr(pool, "write_run", held)
    g1 = G1()
    store(m, g1, keys_for(6))  # four staged, two find no row: dropped, not waited for
    assert m.metrics.value(Count.OFFLOAD_DROPPED) == 2
    assert m.store._disk.write_staging.free == 0
    release.set()
    m.flush()
    assert m.store._disk.write_staging.free == capacity  # back once the disk has them
    store(m, g1, keys_for(4, salt="later"), first_block=8)
    m.flush()
    assert m.metrics.value(Count.OFFLOAD_DROPPED) == 2
    m.close()
