"""The block store: the bytes of G2 and G3, moved as the leader's ops say, verified on every load.

Runs in the vLLM worker process, next to the device KV tensors (G1). Per step:
- `load(ops, device)` (before the forward): reads disk blocks (in parallel, on the disk pool's
  threads) into their G2 promotion slot or a staging buffer, verifies every block's checksum,
  copies the good ones into the device blocks, and returns the device blocks that failed so vLLM
  recomputes them. Synchronous: the forward needs the bytes.
- `store(stores, offloads, device)` (after the forward): copies completed device blocks into G2
  slots (or, without G2, into a staging buffer bound for disk), records their checksums, and
  starts disk writes. It never waits for the disk: writes complete on the pool's threads, are
  journaled once their bytes are written, and are reported to the leader in the next report.
Ordering: a read of a disk slot waits for a write still pending on that slot; writes to one disk
slot are chained in submission order. G2 slots under a pending disk write are pinned by the
leader, so nothing overwrites them mid-write.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.handoff import HandoffPool, handoff_slots
from dynkv.kvbm.host import HostArray
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.journal import Entry, Journal
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.leader import tier_sizes
from dynkv.kvbm.ops import DISK, HANDOFF, HOST, HandoffOp, LoadOp, OffloadOp, StoreOp, StoreReport

log = logging.getLogger("dynkv.kvbm")

MAX_STAGED_BYTES = 512 << 20  # G1→G3 without G2: bytes allowed to wait for the disk


class Device(Protocol):
    """G1 as seen by the store (implemented by `dynkv.kvbm.device.DeviceKV`)."""

    def to_host(self, block_ids: Sequence[int], array: np.ndarray, rows: Sequence[int]) -> None: ...

    def from_host(
        self, array: np.ndarray, rows: Sequence[int], block_ids: Sequence[int]
    ) -> None: ...

    def synchronize(self) -> None: ...


MAX_RUN = 64  # blocks per vectored disk request


@dataclass(frozen=True)
class _Write:
    key: int
    slot: int
    buf: object
    checksum: int
    host_slot: int = -1


@dataclass
class Fetched:
    """Verified blocks ready for the device: (array, rows, device blocks) per source array."""

    copies: list[tuple[np.ndarray, list[int], list[int]]]
    failed: list[int]
    report: StoreReport
    keep: object = None  # staging memory the rows live in


def _runs(items: Sequence, slot_of) -> list[list]:
    """Split `items` (in order) into runs whose disk slots are consecutive, at most MAX_RUN long."""
    out: list[list] = []
    for item in items:
        if out and len(out[-1]) < MAX_RUN and slot_of(item) == slot_of(out[-1][-1]) + 1:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def staging(rows: int, stride: int) -> tuple[np.ndarray, mmap.mmap]:
    """Page-aligned rows (O_DIRECT-ready) outside the G2 pool."""
    mm = mmap.mmap(-1, max(rows, 1) * stride)
    return np.frombuffer(mm, dtype=np.uint8).reshape(max(rows, 1), stride), mm


class BlockStore:
    def __init__(
        self, layout: BlockLayout, settings: KvbmSettings, *, pin_memory: bool = False
    ) -> None:
        self.layout = layout
        self.stride = layout.slot_stride
        host_slots, disk_slots = tier_sizes(layout, settings)
        self.host = HostArray(host_slots, self.stride, pin=pin_memory) if host_slots else None
        self.host_sums = np.zeros(host_slots, dtype=np.uint64)
        self.disk: DiskPool | None = None
        self.journal: Journal | None = None
        self.disk_sums = np.zeros(disk_slots, dtype=np.uint64)
        self.disk_entries: list[Entry] = []
        self._disk_index: dict[int, tuple[int, int]] = {}  # slot -> (key, checksum), write order
        if disk_slots:
            self.disk = DiskPool(
                settings.disk_cache_dir,
                disk_slots,
                self.stride,
                o_direct=not settings.disk_disable_o_direct,
                zerofill_fallback=settings.disk_zerofill_fallback,
            )
            try:
                self.journal = Journal(
                    settings.disk_cache_dir, layout.fingerprint(), self.stride, disk_slots
                )
                if self.disk.reused:
                    self.disk_entries = self.journal.open()
                else:
                    self.journal.compact([])
            except BaseException:
                self.disk.close()
                raise
            for e in self.disk_entries:
                self.disk_sums[e.slot] = e.checksum
                self._disk_index[e.slot] = (e.key, e.checksum)
            if self.disk_entries:
                log.info(
                    "KVBM: disk cache %s holds %d blocks from an earlier run",
                    settings.disk_cache_dir,
                    len(self.disk_entries),
                )
        self.handoff: HandoffPool | None = None
        if settings.handoff_dir is not None:
            # prefill and decode both map it with the same geometry; whichever starts first
            # creates the file (same size), so neither depends on the other's start order
            self.handoff = HandoffPool(
                settings.handoff_dir, self.stride, handoff_slots(settings.handoff_gb, self.stride)
            )
        self._lock = threading.Lock()
        self._disk_writes: dict[int, Future] = {}  # disk slot -> last write submitted
        self._report = StoreReport()
        self._staged_bytes = 0
        self._stage: tuple[np.ndarray, mmap.mmap] | None = None
        self._warned: set[int] = set()
        self._journal_counted = False
        self._count_journal_failure()  # an index that could not be rewritten at start-up

    # ---- load --------------------------------------------------------------------------------------
    def load(self, ops: Sequence[LoadOp], device: Device) -> list[int]:
        """Onboard `ops` into the device; returns the device blocks that could not be loaded."""
        if not ops:
            return []
        fetched = self.fetch(ops)
        t1 = time.perf_counter()
        for array, rows, blocks in fetched.copies:
            device.from_host(array, rows, blocks)
        device.synchronize()
        fetched.report.durations.append(("host_to_device", time.perf_counter() - t1))
        with self._lock:
            self._report.merge(fetched.report)
        return fetched.failed

    def fetch(self, ops: Sequence[LoadOp]) -> Fetched:
        """The host half of a load: disk reads (promoting into G2 or staging) and verification
        of every block. Returns what to copy into the device and what failed; nothing is
        reported until `load` merges the result (the bench calls this alone to time G3→G2)."""
        t0 = time.perf_counter()
        staged_ops = [op for op in ops if op.from_disk and op.host_slot < 0 and not op.from_handoff]
        stage, _keep = self._load_staging(len(staged_ops)) if staged_ops else (None, None)
        stage_row = {id(op): i for i, op in enumerate(staged_ops)}

        def dest(op: LoadOp) -> tuple[np.ndarray, int]:
            if op.from_handoff:
                assert self.handoff is not None
                return self.handoff.array, op.handoff_slot
            if op.host_slot >= 0:
                assert self.host is not None
                return self.host.array, op.host_slot
            return stage, stage_row[id(op)]  # type: ignore[return-value]

        reads: dict[int, Future] = {}
        run_position: dict[int, int] = {}  # op index -> its place in its run
        disk_ops = [(i, op) for i, op in enumerate(ops) if op.from_disk]
        if disk_ops:
            assert self.disk is not None
            with self._lock:
                pending = [self._disk_writes.get(op.disk_slot) for _, op in disk_ops]
            futures_wait([f for f in pending if f is not None])
            for run in _runs(disk_ops, lambda item: item[1].disk_slot):
                bufs = [dest(op)[0][dest(op)[1]] for _, op in run]
                fut = self.disk.read_run(run[0][1].disk_slot, bufs)
                for position, (i, _) in enumerate(run):
                    reads[i] = fut
                    run_position[i] = position
        futures_wait(set(reads.values()))
        disk_seconds = time.perf_counter() - t0 if reads else 0.0

        good_host: list[tuple[int, int]] = []  # (row, device block) in G2
        good_stage: list[tuple[int, int]] = []
        good_handoff: list[tuple[int, int]] = []
        failed: list[int] = []
        unread: list[object] = []  # why each unreadable disk block failed
        report = StoreReport()
        for i, op in enumerate(ops):
            if op.from_handoff:
                if self._handoff_block_valid(op):
                    report.count("handoff_received")
                    good_handoff.append((op.handoff_slot, op.device_block))
                else:
                    report.count("handoff_missed")
                    report.failures.append((HANDOFF, op.handoff_slot, op.key))
                    failed.append(op.device_block)
                continue
            array, row = dest(op)
            ok = True
            if i in reads and (
                reads[i].exception() is not None or reads[i].result() <= run_position[i]
            ):
                unread.append(reads[i].exception() or "the pool file ends before this slot")
                report.count("load_failures")
                report.failures.append((DISK, op.disk_slot, op.key))
                ok = False
            else:
                expected = (
                    self.disk_sums[op.disk_slot] if op.from_disk else self.host_sums[op.host_slot]
                )
                if block_checksum(array[row], op.key) != int(expected):
                    self._integrity_failure(op, report)
                    ok = False
            if not ok:
                failed.append(op.device_block)
                if op.host_slot >= 0 and op.from_disk:  # the promotion slot holds nothing valid
                    report.failures.append((HOST, op.host_slot, op.key))
                continue
            if op.from_disk:
                report.count("onboard_d2d")
                if op.host_slot >= 0:
                    self.host_sums[op.host_slot] = self.disk_sums[op.disk_slot]
                    good_host.append((op.host_slot, op.device_block))
                else:
                    good_stage.append((stage_row[id(op)], op.device_block))
            else:
                report.count("onboard_h2d")
                good_host.append((op.host_slot, op.device_block))
        if unread:  # one line per load, not one per block (a truncated pool fails them all)
            log.warning(
                "KVBM: %d disk block(s) could not be read (%s); vLLM recomputes them",
                len(unread),
                unread[0],
            )
        copies: list[tuple[np.ndarray, list[int], list[int]]] = []
        for array, good in (
            (self.host.array if self.host is not None else None, good_host),
            (stage, good_stage),
            (self.handoff.array if self.handoff is not None else None, good_handoff),
        ):
            if good:
                rows, blocks = zip(*good, strict=True)
                copies.append((array, list(rows), list(blocks)))
        if disk_seconds:
            report.durations.append(("disk_to_host", disk_seconds))
        return Fetched(copies, failed, report, _keep)

    def _load_staging(self, rows: int) -> tuple[np.ndarray, object]:
        """Rows for disk blocks on their way to the device when there is no G2. Loads run one at
        a time (before each forward), so one buffer is reused: a fresh mapping per load would
        fault in every page again (a 33 MB prompt: ~8,000 page faults)."""
        if self._stage is None or self._stage[0].shape[0] < rows:
            self._stage = staging(max(rows, 64), self.stride)
        return self._stage[0][:rows], self._stage[1]

    def _handoff_block_valid(self, op: LoadOp) -> bool:
        """The slot still holds this key's block, intact (the producer may have rewritten it)."""
        if self.handoff is None or not 0 <= op.handoff_slot < self.handoff.slots:
            return False
        key, checksum = self.handoff.read_record(op.handoff_slot)
        valid = (
            key == op.key and block_checksum(self.handoff.array[op.handoff_slot], key) == checksum
        )
        if not valid and op.key not in self._warned:
            self._warned.add(op.key)
            log.info(
                "KVBM: handed-off block %032x is gone from the handoff pool (expired or rewritten); "
                "recomputing it",
                op.key,
            )
        return valid

    def write_handoff(self, ops: Sequence[HandoffOp], device: Device) -> None:
        """Prefill side: copy prompt blocks into the shared pool (synchronous; host memory)."""
        if not ops:
            return
        assert self.handoff is not None
        pool = self.handoff
        for op in ops:
            pool.clear_record(op.slot)
        device.to_host([op.device_block for op in ops], pool.array, [op.slot for op in ops])
        device.synchronize()
        for op in ops:
            pool.write_record(op.slot, op.key, block_checksum(pool.array[op.slot], op.key))
        with self._lock:
            self._report.count("handoff_sent", len(ops))

    def _integrity_failure(self, op: LoadOp, report: StoreReport) -> None:
        report.count("integrity_failures")
        tier, slot = (DISK, op.disk_slot) if op.from_disk else (HOST, op.host_slot)
        report.failures.append((tier, slot, op.key))
        if op.from_disk and self.journal is not None:
            with self._lock:  # forget it on disk too, so a restart does not offer it again
                if self._disk_index.get(slot, (None,))[0] == op.key:
                    del self._disk_index[slot]
                    self.journal.delete(op.key, slot)
                    self._count_journal_failure()
        if op.key not in self._warned:
            self._warned.add(op.key)
            log.warning(
                "KVBM: %s block %032x failed its checksum; it will be recomputed", tier, op.key
            )

    # ---- store -------------------------------------------------------------------------------------
    def store(
        self, stores: Sequence[StoreOp], offloads: Sequence[OffloadOp], device: Device
    ) -> None:
        """Copy completed device blocks out (synchronously), then start disk writes."""
        report = StoreReport()
        to_host = [op for op in stores if op.host_slot >= 0]
        to_disk = [op for op in stores if op.host_slot < 0 and op.disk_slot >= 0]
        if to_host:
            assert self.host is not None
            t0 = time.perf_counter()
            rows = [op.host_slot for op in to_host]
            device.to_host([op.device_block for op in to_host], self.host.array, rows)
            device.synchronize()
            for op in to_host:
                self.host_sums[op.host_slot] = block_checksum(self.host.array[op.host_slot], op.key)
            report.count("offload_d2h", len(to_host))
            report.durations.append(("device_to_host", time.perf_counter() - t0))
        if to_disk:
            self._store_direct_to_disk(to_disk, device, report)
        if offloads:
            assert self.host is not None
            host = self.host.array
            self._write_blocks(
                [
                    _Write(
                        op.key,
                        op.disk_slot,
                        host[op.host_slot],
                        int(self.host_sums[op.host_slot]),
                        op.host_slot,
                    )
                    for op in offloads
                ],
                counter="offload_h2d",
            )
        with self._lock:
            self._report.merge(report)

    def _store_direct_to_disk(self, ops: Sequence[StoreOp], device: Device, report: StoreReport):
        with self._lock:
            room = max(0, (MAX_STAGED_BYTES - self._staged_bytes) // self.stride)
        accepted, dropped = list(ops[:room]), list(ops[room:])
        for op in dropped:
            report.count("offload_dropped")
            report.failures.append((DISK, op.disk_slot, op.key))
        if not accepted:
            return
        rows, keep = staging(len(accepted), self.stride)
        device.to_host([op.device_block for op in accepted], rows, list(range(len(accepted))))
        device.synchronize()
        with self._lock:
            self._staged_bytes += len(accepted) * self.stride
        writes = [
            _Write(op.key, op.disk_slot, rows[i], block_checksum(rows[i], op.key))
            for i, op in enumerate(accepted)
        ]
        self._write_blocks(writes, counter="offload_d2d", keep=keep, staged=True)

    def _write_blocks(
        self, writes: list[_Write], *, counter: str, keep: object = None, staged: bool = False
    ) -> None:
        """Submit writes as runs of consecutive disk slots (one pwritev each). A run starts once
        every write still pending on any of its slots has finished: a slot's writes land in order.
        Each block is journaled, counted and reported when its run completes."""
        assert self.disk is not None and self.journal is not None
        disk = self.disk
        for run in _runs(writes, lambda w: w.slot):
            t0 = time.perf_counter()
            with self._lock:
                after = [self._disk_writes.get(w.slot) for w in run]
                fut = disk.write_run(run[0].slot, [w.buf for w in run], after)
                for w in run:
                    self._disk_writes[w.slot] = fut

            def done(f: Future, run=run, t0=t0, _keep=keep) -> None:
                # Bookkeeping first and unconditionally: a slot left in _disk_writes would make
                # flush() wait forever, a missing offload ack would pin its G2 slot for good.
                exc = f.exception()
                with self._lock:
                    for w in run:
                        if self._disk_writes.get(w.slot) is f:
                            del self._disk_writes[w.slot]
                        if staged:
                            self._staged_bytes -= self.stride
                        if exc is None:
                            self.disk_sums[w.slot] = w.checksum
                            self._disk_index.pop(w.slot, None)
                            self._disk_index[w.slot] = (w.key, w.checksum)
                        else:
                            self._report.failures.append((DISK, w.slot, w.key))
                        if w.host_slot >= 0:
                            self._report.offloads_done.append(w.host_slot)
                    if exc is None:
                        self._report.count(counter, len(run))
                        self._report.durations.append(("host_to_disk", time.perf_counter() - t0))
                        self._journal_puts(run)
                if exc is not None:
                    log.warning(
                        "KVBM: a disk write failed; %d blocks not offloaded: %s", len(run), exc
                    )

            fut.add_done_callback(done)

    def _journal_puts(self, run: Sequence[_Write]) -> None:
        """Journal written blocks (under the lock). The journal never raises: a write it cannot
        make disables it (one log line); that is counted here, once."""
        journal = self.journal
        assert journal is not None
        for w in run:
            journal.put(w.key, w.slot, w.checksum)
        if journal.needs_compaction():
            journal.compact(self._live_entries())
        self._count_journal_failure()

    def _count_journal_failure(self) -> None:
        if self.journal is not None and self.journal.broken and not self._journal_counted:
            self._journal_counted = True
            self._report.count("journal_failures")

    def _live_entries(self) -> list[Entry]:
        """What the journal must keep: the last block written to each slot, oldest first."""
        return [Entry(key, slot, c) for slot, (key, c) in self._disk_index.items()]

    # ---- reporting and lifecycle -------------------------------------------------------------------
    def take_report(self) -> StoreReport:
        with self._lock:
            report, self._report = self._report, StoreReport()
        return report

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every disk write submitted so far (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._disk_writes.values())
            if not pending:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{len(pending)} disk writes still pending")
            futures_wait(pending, timeout=remaining)
            time.sleep(0.0005)  # let completion callbacks run

    def close(self) -> None:
        self.flush()
        if self.journal is not None:
            with self._lock:
                self.journal.close()
        if self.disk is not None:
            self.disk.close()
        if self.handoff is not None:
            self.handoff.close()
