"""The prefill → decode handoff through the shared-memory pool, with two real block managers."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from kvbm_helpers import G1, LAYOUT, expected_bytes, keys_for, settings

from dynkv.kvbm.counters import Count
from dynkv.kvbm.handoff import POOL_FILE, RECORD
from dynkv.kvbm.manager import BlockManager


@pytest.fixture
def shm():
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-handoff-"))
    yield path / "pool"
    shutil.rmtree(path)


def manager(pool, **kw):
    return BlockManager(LAYOUT, settings(handoff_dir=pool, **kw))


def test_prefill_hands_blocks_to_decode_byte_exact(shm):
    prefill, decode = manager(shm, cpu_cache_override_num_blocks=8), manager(shm)
    g1_p, g1_d = G1(), G1()
    keys = keys_for(5)
    for block, key in enumerate(keys):
        g1_p.put(block, key)
    slots = prefill.hand_off(keys, g1_p.dev, list(range(5)))
    assert len(slots) == 5
    failed = decode.receive(keys, slots, g1_d.dev, list(range(20, 25)))
    assert failed == []
    assert [g1_d.get(20 + i) for i in range(5)] == [expected_bytes(k) for k in keys]
    assert prefill.metrics.value(Count.HANDOFF_SENT) == 5
    assert decode.metrics.value(Count.HANDOFF_RECEIVED) == 5
    # the same prefix handed off again reuses the slots: nothing copied twice
    assert prefill.hand_off(keys, g1_p.dev, list(range(5))) == slots
    assert prefill.metrics.value(Count.HANDOFF_SENT) == 5
    prefill.close()
    decode.close()


def test_rewritten_slots_are_recomputed_not_used(shm):
    # a pool of 3 blocks: handing off 3 more rewrites every slot of the first handoff (a ring)
    gb = 3 * (LAYOUT.slot_stride + RECORD.size) / 1e9
    prefill, decode = manager(shm, handoff_gb=gb), manager(shm, handoff_gb=gb)
    g1_p, g1_d = G1(), G1()
    first, second = keys_for(3), keys_for(3, salt="other")
    for block, key in enumerate(first + second):
        g1_p.put(block, key)
    slots = prefill.hand_off(first, g1_p.dev, [0, 1, 2])
    prefill.hand_off(second, g1_p.dev, [3, 4, 5])
    failed = decode.receive(first, slots, g1_d.dev, [10, 11, 12])
    assert failed == [10, 11, 12]
    assert decode.metrics.value(Count.HANDOFF_MISSED) == 3
    prefill.close()
    decode.close()


def test_a_slot_claimed_for_another_key_is_refused(shm):
    prefill, decode = manager(shm), manager(shm)
    g1_p, g1_d = G1(), G1()
    keys = keys_for(2)
    for block, key in enumerate(keys):
        g1_p.put(block, key)
    slots = prefill.hand_off(keys, g1_p.dev, [0, 1])
    # a forged or stale handoff: right slots, other keys (another prompt or salt)
    assert decode.receive(keys_for(2, salt="x"), slots, g1_d.dev, [5, 6]) == [5, 6]
    assert decode.receive(keys, [slots[1], slots[0]], g1_d.dev, [5, 6]) == [5, 6]
    assert decode.receive(keys, [10_000_000, slots[1]], g1_d.dev, [5, 6]) == [5]
    prefill.close()
    decode.close()


def test_pool_is_private(shm):
    m = manager(shm)
    assert stat.S_IMODE(shm.stat().st_mode) == 0o700
    assert stat.S_IMODE((shm / POOL_FILE).stat().st_mode) == 0o600
    m.close()


def test_the_pool_is_private_even_in_a_directory_made_readable(shm):
    """Prompts' KV bytes live in the pool: 0700 directory and 0600 file, whatever existed (a
    directory others could *write* is refused: tests/unit/test_shared_paths.py)."""
    shm.mkdir(mode=0o755)
    os.chmod(shm, 0o755)
    prefill = manager(shm, cpu_cache_override_num_blocks=8)
    assert stat.S_IMODE(os.stat(shm).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(shm / "handoff.bin").st_mode) == 0o600
    prefill.close()


class _RacingDevice:
    """The decode's G1, with a hook that runs just before its host → device copy: the window in
    which a prefill engine may rewrite the handoff slots being read (a ring wraps under load)."""

    def __init__(self, g1: G1, before_copy) -> None:
        self.g1, self.before_copy = g1, before_copy

    def from_host(self, array, rows, block_ids) -> None:
        hook, self.before_copy = self.before_copy, None
        if hook is not None:
            hook()
        self.g1.dev.from_host(array, rows, block_ids)

    def to_host(self, block_ids, array, rows) -> None:
        self.g1.dev.to_host(block_ids, array, rows)

    def synchronize(self) -> None:
        self.g1.dev.synchronize()


def _ring_of_three(shm):
    gb = 3 * (LAYOUT.slot_stride + RECORD.size) / 1e9
    prefill, decode = manager(shm, handoff_gb=gb), manager(shm, handoff_gb=gb)
    g1_p = G1()
    first, second = keys_for(3), keys_for(3, salt="other")
    for block, key in enumerate(first + second):
        g1_p.put(block, key)
    slots = prefill.hand_off(first, g1_p.dev, [0, 1, 2])
    return prefill, decode, g1_p, first, second, slots


def test_a_slot_rewritten_after_verification_never_reaches_the_device(shm):
    """Verified bytes are what the device gets: the prefill rewriting every slot after the check
    (before the device copy) changes nothing the decode uses."""
    prefill, decode, g1_p, first, second, slots = _ring_of_three(shm)
    g1_d = G1()
    device = _RacingDevice(g1_d, lambda: prefill.hand_off(second, g1_p.dev, [3, 4, 5]))
    failed = decode.receive(first, slots, device, [10, 11, 12])
    assert device.before_copy is None  # the rewrite did happen inside the window
    got = [g1_d.get(b) for b in (10, 11, 12)]
    assert not set(got) & {expected_bytes(k) for k in second}  # never the rewritten bytes
    assert failed == []
    assert got == [expected_bytes(k) for k in first]  # the verified, private copy
    prefill.close()
    decode.close()


def test_a_slot_rewritten_between_the_record_check_and_the_copy_is_a_miss(shm, monkeypatch):
    """The rewrite lands after the reader took the slot's record and before it copied the data:
    the private copy fails the record's checksum, the blocks are recomputed."""
    prefill, decode, g1_p, first, second, slots = _ring_of_three(shm)
    pool = decode.store.handoff
    read_record = pool.read_record
    rewritten: list[bool] = []

    def read_then_rewrite(slot):
        record = read_record(slot)
        if not rewritten:
            rewritten.append(True)
            prefill.hand_off(second, g1_p.dev, [3, 4, 5])
        return record

    monkeypatch.setattr(pool, "read_record", read_then_rewrite)
    g1_d = G1()
    failed = decode.receive(first, slots, g1_d.dev, [10, 11, 12])
    assert rewritten and failed == [10, 11, 12]
    assert decode.metrics.value(Count.HANDOFF_MISSED) == 3
    assert decode.metrics.value(Count.HANDOFF_RECEIVED) == 0
    zeros = bytes(LAYOUT.bytes_per_block)
    assert [g1_d.get(b) for b in (10, 11, 12)] == [zeros] * 3  # nothing copied: recomputed
    prefill.close()
    decode.close()
