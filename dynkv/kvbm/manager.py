"""The block manager: lookup, load and store of KV blocks across the host (G2) and disk (G3) tiers.

The API, in the order a connector uses it:

    match(keys)                 longest prefix of `keys` held by any tier; no side effects
    record_lookup(asked, m)     feeds the hit-rate window (once per request)
    load = start_load(keys)     pins hits, starts disk reads; load.wait() -> LoadResult
    ... copy result rows into the device (G1) ...
    finish_load(result)         unpins
    plan = start_store(keys)    slots for the blocks not stored yet (known ones are touched)
    ... copy device blocks into plan rows ...
    commit_store(plan)          checksums, publish, write-through to disk (asynchronous)

Blocks are opaque rows of `layout.slot_stride` bytes in a host array: G2's own slots, or staging
rows when there is no G2 (G1→G3 directly). Policies (DESIGN §4):
- write-through G1→G2 for every completed block; G2→G3 through the SSD frequency filter when both
  tiers exist (a block goes to disk once its frequency reaches 2, i.e. when it is reused), or for
  every block when the filter is disabled; G1→G3 directly when there is no G2 (no filter);
- LRU eviction within each tier; a prefix lookup stops at the first block no tier holds;
- a checksum per stored block is verified on every load: a mismatch is a miss, counted in
  `kvbm_integrity_failures`, logged once per block, and the block dropped — never wrong bytes;
- disk hits are promoted into G2 (when it exists) on their way to the device;
- disk writes never block the caller: they run on the disk pool's threads and a block becomes
  visible only after its bytes are written (then journaled, so it survives a restart).
Thread-safe: one lock guards all bookkeeping; copies and I/O happen outside it.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.filter import FrequencyFilter
from dynkv.kvbm.host import HostArray
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.journal import Entry, Journal
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.kvbm.slots import PoolFull, SlotIndex

log = logging.getLogger("dynkv.kvbm")

MAX_STAGED_BYTES = 512 << 20  # G1→G3 without G2: bound on bytes waiting for the disk


class Tier(StrEnum):
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class Match:
    tiers: tuple[Tier, ...]

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def host_blocks(self) -> int:
        return sum(1 for t in self.tiers if t is Tier.HOST)

    @property
    def disk_blocks(self) -> int:
        return sum(1 for t in self.tiers if t is Tier.DISK)


@dataclass
class LoadResult:
    """Rows of `array` to copy into the device, per requested block; `ok[i]` False = recompute."""

    keys: list[int]
    array: np.ndarray
    rows: list[int]
    ok: list[bool]
    sources: list[Tier | None]
    _host_pins: list[int] = field(default_factory=list)
    _staging: object = None

    @property
    def failed(self) -> list[int]:
        return [i for i, good in enumerate(self.ok) if not good]


@dataclass
class _Pending:
    """One block of a load in progress."""

    key: int
    source: Tier | None
    row: int = -1  # row in the result array
    disk_slot: int = -1
    read: Future | None = None


class LoadHandle:
    def __init__(self, manager: BlockManager, result: LoadResult, pending: list[_Pending]):
        self._manager = manager
        self._result = result
        self._pending = pending
        self._done = False

    def wait(self) -> LoadResult:
        if not self._done:
            self._manager._complete_load(self._result, self._pending)
            self._done = True
        return self._result


@dataclass
class StorePlan:
    """Rows to fill with the blocks `keys` (new to the runtime), then `commit_store`."""

    keys: list[int]
    array: np.ndarray
    rows: list[int]
    to_host: bool
    _staging: object = None

    def __len__(self) -> int:
        return len(self.keys)


class _HostTier:
    def __init__(self, slots: int, stride: int, pin: bool) -> None:
        self.memory = HostArray(slots, stride, pin=pin)
        self.array = self.memory.array
        self.index = SlotIndex(slots)
        self.checksums = np.zeros(slots, dtype=np.uint64)


class _DiskTier:
    def __init__(self, layout: BlockLayout, slots: int, settings: KvbmSettings) -> None:
        self.pool = DiskPool(
            settings.disk_cache_dir,
            slots,
            layout.slot_stride,
            o_direct=not settings.disk_disable_o_direct,
            zerofill_fallback=settings.disk_zerofill_fallback,
        )
        self.index = SlotIndex(slots)
        self.checksums: dict[int, int] = {}
        self.pending: set[int] = set()  # keys being written
        try:
            self.journal = Journal(
                settings.disk_cache_dir, layout.fingerprint(), layout.slot_stride, slots
            )
            entries = self.journal.open() if self.pool.reused else self._fresh()
        except BaseException:
            self.pool.close()
            raise
        self.index.restore((e.key, e.slot) for e in entries)
        self.checksums = {e.key: e.checksum for e in entries if e.key in self.index}
        self.restored = len(self.index)

    def _fresh(self) -> list[Entry]:
        self.journal.compact([])
        return []

    def entries(self) -> list[Entry]:
        return [
            Entry(k, self.index.slot_of(k), self.checksums[k])  # type: ignore[arg-type]
            for k in self.index.keys_lru()
        ]


def _staging_array(rows: int, stride: int) -> tuple[np.ndarray, mmap.mmap]:
    mm = mmap.mmap(-1, max(rows, 1) * stride)
    return np.frombuffer(mm, dtype=np.uint8).reshape(max(rows, 1), stride), mm


class BlockManager:
    def __init__(
        self,
        layout: BlockLayout,
        settings: KvbmSettings,
        *,
        metrics: KvbmMetrics | None = None,
        pin_memory: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.settings = settings
        self.metrics = metrics or KvbmMetrics()
        bpb = layout.bytes_per_block
        host_slots = settings.host_blocks(bpb)
        disk_slots = settings.disk_blocks(bpb)
        if not host_slots and not disk_slots:
            raise KvbmConfigError(
                f"no KVBM tier is configured, or the tiers are smaller than one block "
                f"({bpb} bytes)",
                "export DYN_KVBM_CPU_CACHE_GB=4 (host tier) and/or DYN_KVBM_DISK_CACHE_GB=8",
            )
        self._lock = threading.RLock()
        self._warned_integrity: set[int] = set()
        self._writes: set[Future] = set()
        self._staged_bytes = 0
        self.host = _HostTier(host_slots, layout.slot_stride, pin_memory) if host_slots else None
        self.disk = _DiskTier(layout, disk_slots, settings) if disk_slots else None
        self.filter = (
            FrequencyFilter(
                settings.disk_offload_filter_decay_secs,
                settings.disk_offload_filter_max_entries,
                clock,
            )
            if self.host and self.disk and not settings.disable_disk_offload_filter
            else None
        )
        self.metrics.bind_capacity(
            (lambda: len(self.host.index)) if self.host else None,
            host_slots,
            (lambda: len(self.disk.index)) if self.disk else None,
            disk_slots,
        )
        if self.disk and self.disk.restored:
            log.info(
                "KVBM: disk cache %s restored %d blocks",
                settings.disk_cache_dir,
                self.disk.restored,
            )

    # ---- lookup ----------------------------------------------------------------------------------
    def match(self, keys: Sequence[int]) -> Match:
        tiers: list[Tier] = []
        with self._lock:
            for key in keys:
                if self.host and key in self.host.index:
                    tiers.append(Tier.HOST)
                elif self.disk and key in self.disk.index:
                    tiers.append(Tier.DISK)
                else:
                    break
        return Match(tuple(tiers))

    def record_lookup(self, asked: int, match: Match) -> None:
        self.metrics.record_request(asked, match.host_blocks, match.disk_blocks)

    # ---- load ------------------------------------------------------------------------------------
    def start_load(self, keys: Sequence[int]) -> LoadHandle:
        keys = list(keys)
        pending: list[_Pending] = []
        staging = None
        with self._lock:
            if self.host:
                array = self.host.array
            else:
                array, staging = _staging_array(len(keys), self.layout.slot_stride)
            result = LoadResult(
                keys, array, [-1] * len(keys), [False] * len(keys), [None] * len(keys)
            )
            result._staging = staging
            for i, key in enumerate(keys):
                p = _Pending(key, None)
                if self.host and key in self.host.index:
                    slot = self.host.index.slot_of(key)
                    assert slot is not None
                    self.host.index.pin(slot)
                    result._host_pins.append(slot)
                    p.source, p.row = Tier.HOST, slot
                elif self.disk and key in self.disk.index:
                    dslot = self.disk.index.slot_of(key)
                    assert dslot is not None
                    if self.host:
                        try:
                            row, evicted = self.host.index.reserve()
                        except PoolFull:
                            pending.append(p)
                            continue
                    else:
                        row = i
                    self.disk.index.pin(dslot)
                    p.source, p.row, p.disk_slot = Tier.DISK, row, dslot
                pending.append(p)
        t0 = time.perf_counter()
        for p in pending:
            if p.source is Tier.DISK:
                assert self.disk
                p.read = self.disk.pool.read(p.disk_slot, array[p.row])
        result._t0 = t0  # type: ignore[attr-defined]
        return LoadHandle(self, result, pending)

    def _complete_load(self, result: LoadResult, pending: list[_Pending]) -> None:
        read_errors: dict[int, BaseException] = {}
        for i, p in enumerate(pending):
            if p.read is not None:
                exc = p.read.exception()
                if exc is not None:
                    read_errors[i] = exc
        if any(p.source is Tier.DISK for p in pending):
            self.metrics.transfer_seconds.labels("disk_to_host").observe(
                time.perf_counter() - result._t0  # type: ignore[attr-defined]
            )
        sums = [
            block_checksum(result.array[p.row], p.key)
            if p.source is not None and i not in read_errors
            else None
            for i, p in enumerate(pending)
        ]
        host_ok = disk_ok = 0
        offload: list[tuple[int, int]] = []
        with self._lock:
            for i, p in enumerate(pending):
                good = False
                if p.source is Tier.HOST:
                    assert self.host
                    good = sums[i] == int(self.host.checksums[p.row])
                    if not good:
                        self._integrity_failure(p.key, "host")
                        self.host.index.remove(p.key)
                    else:
                        host_ok += 1
                elif p.source is Tier.DISK:
                    assert self.disk
                    expected = self.disk.checksums.get(p.key)
                    if i in read_errors:
                        log.warning("KVBM: disk read of a block failed: %s", read_errors[i])
                        self.metrics.load_failures.inc()
                    elif sums[i] == expected:
                        good = True
                    else:
                        self._integrity_failure(p.key, "disk")
                        if self.disk.index.slot_of(p.key) == p.disk_slot:
                            self._drop_disk_block(p.key)
                    self.disk.index.unpin(p.disk_slot)
                    if self.host:
                        if good:
                            self.host.index.publish(p.row, p.key)
                            self.host.checksums[p.row] = sums[i]
                            self.host.index.pin(p.row)
                            result._host_pins.append(p.row)
                        else:
                            self.host.index.release(p.row)
                    if good:
                        disk_ok += 1
                else:
                    self.metrics.load_failures.inc()
                result.ok[i] = good
                result.rows[i] = p.row if good else -1
                result.sources[i] = p.source
                if good:
                    if self.host and p.source is Tier.HOST:
                        self.host.index.touch(p.key)
                    elif self.disk and p.source is Tier.DISK and p.key in self.disk.index:
                        self.disk.index.touch(p.key)
                    if self.filter is not None and self.filter.observe(p.key) >= 2:
                        offload.append((p.key, p.row))
            for key, row in offload:
                self._offload_host_to_disk(key, row)
        self.metrics.onboard_h2d.inc(host_ok)
        self.metrics.onboard_d2d.inc(disk_ok)

    def finish_load(self, result: LoadResult) -> None:
        with self._lock:
            if self.host:
                for slot in result._host_pins:
                    self.host.index.unpin(slot)
            result._host_pins = []
        result._staging = None

    # ---- store -----------------------------------------------------------------------------------
    def start_store(self, keys: Sequence[int]) -> StorePlan:
        new: list[int] = []
        rows: list[int] = []
        staging = None
        offload: list[tuple[int, int]] = []
        with self._lock:
            if self.host:
                for key in keys:
                    if key in self.host.index:
                        self.host.index.touch(key)
                        if self.filter is not None and self.filter.observe(key) >= 2:
                            offload.append((key, self.host.index.slot_of(key)))  # type: ignore[arg-type]
                        continue
                    if key in new:
                        continue
                    try:
                        slot, _evicted = self.host.index.reserve()
                    except PoolFull:
                        self.metrics.offload_dropped.inc()
                        continue
                    new.append(key)
                    rows.append(slot)
                for key, slot in offload:
                    self._offload_host_to_disk(key, slot)
                return StorePlan(new, self.host.array, rows, to_host=True)
            assert self.disk
            for key in keys:
                if key in self.disk.index:
                    self.disk.index.touch(key)
                    continue
                if key in self.disk.pending or key in new:
                    continue
                if self._staged_bytes + self.layout.slot_stride > MAX_STAGED_BYTES:
                    self.metrics.offload_dropped.inc()
                    continue
                self._staged_bytes += self.layout.slot_stride
                new.append(key)
            array, staging = _staging_array(len(new), self.layout.slot_stride)
            return StorePlan(new, array, list(range(len(new))), to_host=False, _staging=staging)

    def commit_store(self, plan: StorePlan) -> None:
        sums = [
            block_checksum(plan.array[row], key)
            for key, row in zip(plan.keys, plan.rows, strict=True)
        ]
        with self._lock:
            if plan.to_host:
                assert self.host
                for key, row, c in zip(plan.keys, plan.rows, sums, strict=True):
                    self.host.index.publish(row, key)
                    self.host.checksums[row] = c
                    freq = self.filter.observe(key) if self.filter is not None else None
                    if self.disk and (freq is None or freq >= 2):
                        self._offload_host_to_disk(key, row)
                self.metrics.offload_d2h.inc(len(plan.keys))
            else:
                for key, row, c in zip(plan.keys, plan.rows, sums, strict=True):
                    self._write_to_disk(key, plan.array, row, c, hold=plan._staging, host_slot=None)

    def abort_store(self, plan: StorePlan) -> None:
        with self._lock:
            if plan.to_host and self.host:
                for row in plan.rows:
                    self.host.index.release(row)
            else:
                self._staged_bytes -= len(plan.keys) * self.layout.slot_stride

    # ---- disk writes -----------------------------------------------------------------------------
    def _offload_host_to_disk(self, key: int, slot: int) -> None:
        """Copy a G2 block to G3 (called with the lock held). The G2 slot stays pinned until the
        write completes, so eviction cannot hand it to another block mid-write."""
        assert self.host and self.disk
        if key in self.disk.index or key in self.disk.pending:
            return
        self.host.index.pin(slot)
        self._write_to_disk(key, self.host.array, slot, int(self.host.checksums[slot]), None, slot)

    def _write_to_disk(self, key, array, row, checksum, hold, host_slot) -> None:
        assert self.disk
        disk = self.disk
        try:
            dslot, evicted = disk.index.reserve()
        except PoolFull:
            self.metrics.offload_dropped.inc()
            self._after_write(host_slot, staged=host_slot is None)
            return
        if evicted is not None:
            disk.checksums.pop(evicted, None)
            disk.journal.delete(evicted, dslot)
        disk.pending.add(key)
        t0 = time.perf_counter()
        fut = disk.pool.write(dslot, array[row])
        self._writes.add(fut)

        def done(f: Future, _hold=hold) -> None:
            elapsed = time.perf_counter() - t0
            with self._lock:
                self._writes.discard(f)
                disk.pending.discard(key)
                exc = f.exception()
                if exc is not None:
                    log.warning("KVBM: disk write failed, block not offloaded: %s", exc)
                    disk.index.release(dslot)
                else:
                    old = disk.index.publish(dslot, key)
                    if old is not None:
                        disk.journal.delete(key, old)
                    disk.checksums[key] = checksum
                    disk.journal.put(key, dslot, checksum)
                    if host_slot is None:
                        self.metrics.offload_d2d.inc()
                    else:
                        self.metrics.offload_h2d.inc()
                    if disk.journal.needs_compaction():
                        disk.journal.compact(disk.entries())
                self._after_write(host_slot, staged=host_slot is None)
            self.metrics.transfer_seconds.labels("host_to_disk").observe(elapsed)

        fut.add_done_callback(done)

    def _after_write(self, host_slot: int | None, staged: bool) -> None:
        if host_slot is not None and self.host:
            self.host.index.unpin(host_slot)
        if staged:
            self._staged_bytes -= self.layout.slot_stride

    def _drop_disk_block(self, key: int) -> None:
        assert self.disk
        slot = self.disk.index.remove(key)
        self.disk.checksums.pop(key, None)
        if slot is not None:
            self.disk.journal.delete(key, slot)

    def _integrity_failure(self, key: int, tier: str) -> None:
        self.metrics.integrity_failures.inc()
        if key not in self._warned_integrity:
            self._warned_integrity.add(key)
            log.warning(
                "KVBM: %s block %032x failed its checksum; dropped, it will be recomputed",
                tier,
                key,
            )

    # ---- lifecycle -------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait for every disk write started so far (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                writes = list(self._writes)
            if not writes:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{len(writes)} disk writes still pending")
            futures_wait(writes, timeout=remaining)
            # completion callbacks run right after each result is set; give them a moment
            time.sleep(0.0005)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "host_blocks_used": len(self.host.index) if self.host else 0,
                "host_blocks_total": self.host.index.capacity if self.host else 0,
                "disk_blocks_used": len(self.disk.index) if self.disk else 0,
                "disk_blocks_total": self.disk.index.capacity if self.disk else 0,
                "disk_writes_pending": len(self._writes),
                "filter_entries": len(self.filter) if self.filter is not None else 0,
            }

    def close(self) -> None:
        self.flush()
        if self.disk:
            with self._lock:
                self.disk.journal.close()
            self.disk.pool.close()
        self.metrics.close()
