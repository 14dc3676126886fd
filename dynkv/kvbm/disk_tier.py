"""The G3 handler: disk reads with a deadline, verified in private memory, promoted into G2; and
disk writes, chained per slot and journaled once their bytes are on disk.

Reads: a load first waits for any write still pending on its slots, then reads runs of
consecutive slots (one preadv each, on the disk pool's threads) into `Staging` rows, never into
G2 directly. Both waits share one deadline (`DYN_KVBM_DISK_READ_TIMEOUT_MS`): a block not read
by then is a miss (`kvbm_disk_read_timeouts_total`), vLLM recomputes it, and the staging buffer
is abandoned because the late read may still write into it. A stalled disk thus costs one
deadline per load, never a frozen engine. A verified block is copied into its G2 promotion slot.

Writes never block the engine: they complete on the pool's threads; each block is journaled,
counted and reported to the leader (through `take_report`) when its run completes. Without G2
they leave from `WriteStaging` rows, reused from store to store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from functools import partial

import numpy as np

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.counters import Count
from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.handlers import Device, HostHandler, Rows, Staging, WarnOnce
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.journal import Entry, Journal
from dynkv.kvbm.ops import LoadOp, OffloadOp, StoreOp, StoreReport, Tier
from dynkv.kvbm.write_staging import WriteStaging

log = logging.getLogger("dynkv.kvbm")

MAX_RUN = 64  # blocks per vectored disk write
# blocks per vectored disk read: several reads in flight at once, each checksummed by the thread
# that read it, so reading and verifying a load's blocks use every core the pool can get
MAX_READ_RUN = 16
MAX_STAGED_BYTES = 512 << 20  # G1→G3 without G2: bytes allowed to wait for the disk


@dataclass(frozen=True)
class _Write:
    key: int
    slot: int
    buf: object
    checksum: int
    host_slot: int = -1
    staged_row: int = -1  # the `WriteStaging` row `buf` is, freed when the write completes


def _checksums(rows: Sequence[np.ndarray], keys: Sequence[int], read: int) -> list[int]:
    """Checksums of the first `read` rows (those a run's preadv filled), each seeded with its key."""
    return [block_checksum(rows[i], keys[i]) for i in range(read)]


def runs(items: Sequence, slot_of: Callable, longest: int = MAX_RUN) -> list[list]:
    """Split `items` (in order) into runs whose disk slots are consecutive, at most `longest`."""
    out: list[list] = []
    for item in items:
        if out and len(out[-1]) < longest and slot_of(item) == slot_of(out[-1][-1]) + 1:
            out[-1].append(item)
        else:
            out.append([item])
    return out


class DiskHandler:
    tier = Tier.DISK

    def __init__(
        self,
        settings: KvbmSettings,
        slots: int,
        stride: int,
        fingerprint: bytes,
        *,
        host: HostHandler | None,
        staging: Staging,
        warn: WarnOnce,
    ) -> None:
        self.stride = stride
        self.host = host
        self.staging = staging
        self.read_timeout = settings.disk_read_timeout_ms / 1000
        self._warn = warn
        self.pool = DiskPool(
            settings.disk_cache_dir,
            slots,
            stride,
            o_direct=not settings.disk_disable_o_direct,
            zerofill_fallback=settings.disk_zerofill_fallback,
        )
        self.sums = np.zeros(slots, dtype=np.uint64)
        self._index: dict[int, tuple[int, int]] = {}  # slot -> (key, checksum), write order
        try:
            self.journal = Journal(settings.disk_cache_dir, fingerprint, stride, slots)
            if self.pool.reused:
                self.entries = self.journal.open()
            else:
                self.entries = []
                self.journal.compact([])
        except BaseException:
            self.pool.close()
            raise
        for e in self.entries:
            self.sums[e.slot] = e.checksum
            self._index[e.slot] = (e.key, e.checksum)
        if self.entries:
            log.info(
                "KVBM: disk cache %s holds %d blocks from an earlier run",
                settings.disk_cache_dir,
                len(self.entries),
            )
        self._lock = threading.Lock()
        self._checked: dict[int, int] = {}  # disk slot -> checksum of what this load read
        self._writes: dict[int, Future] = {}  # disk slot -> last write submitted
        self.write_staging = WriteStaging(MAX_STAGED_BYTES, stride)
        self._report = StoreReport()  # what completed writes have to say, until taken
        self._journal_counted = False
        self._count_journal_failure()  # an index that could not be rewritten at start-up

    # ---- read / verify ---------------------------------------------------------------------------
    def read(self, ops: Sequence[LoadOp], into: np.ndarray, report: StoreReport) -> Rows:
        deadline = time.monotonic() + self.read_timeout
        with self._lock:
            pending = {op.disk_slot: self._writes.get(op.disk_slot) for op in ops}
        futures_wait([f for f in pending.values() if f is not None], timeout=self.read_timeout)
        blocked = {s for s, f in pending.items() if f is not None and not f.done()}
        reads: dict[int, tuple[Future, int]] = {}  # op index -> (its run's read, place in run)
        readable = [(i, op) for i, op in enumerate(ops) if op.disk_slot not in blocked]
        self._checked = {}
        for run in runs(readable, lambda item: item[1].disk_slot, MAX_READ_RUN):
            rows = [into[i] for i, _ in run]
            keys = [op.key for _, op in run]
            fut = self.pool.read_run(run[0][1].disk_slot, rows, partial(_checksums, rows, keys))
            for position, (i, _) in enumerate(run):
                reads[i] = (fut, position)
        futures_wait({f for f, _ in reads.values()}, timeout=max(0.0, deadline - time.monotonic()))
        rows: list[int | None] = []
        late: list[LoadOp] = []
        unread: list[object] = []  # why each unreadable block failed
        for i, op in enumerate(ops):
            fut, position = reads.get(i, (None, 0))
            if fut is None or not fut.done():
                late.append(op)
                self._fail(op, report, Count.DISK_READ_TIMEOUTS)
                rows.append(None)
            elif fut.exception() is not None or fut.result()[0] <= position:
                unread.append(fut.exception() or "the pool file ends before this slot")
                self._fail(op, report, Count.LOAD_FAILURES)
                rows.append(None)
            else:
                self._checked[op.disk_slot] = fut.result()[1][position]
                rows.append(i)
        self._log_misses(late, unread)
        return Rows(into, rows)

    def _fail(self, op: LoadOp, report: StoreReport, counter: Count) -> None:
        report.count(counter)
        if counter is not Count.DISK_READ_TIMEOUTS:  # a slow disk does not make the block bad
            report.failures.append((Tier.DISK, op.disk_slot, op.key))
        if op.host_slot >= 0:  # the promotion slot holds nothing valid
            report.failures.append((Tier.HOST, op.host_slot, op.key))

    def _log_misses(self, late: list[LoadOp], unread: list[object]) -> None:
        """One line per load, not one per block (a truncated pool fails them all)."""
        if late:
            self.staging.abandon()  # the late reads may still land in it
            log.warning(
                "KVBM: %d disk block(s) not read within DYN_KVBM_DISK_READ_TIMEOUT_MS=%g; "
                "vLLM recomputes them",
                len(late),
                self.read_timeout * 1000,
            )
        if unread:
            log.warning(
                "KVBM: %d disk block(s) could not be read (%s); vLLM recomputes them",
                len(unread),
                unread[0],
            )

    def verify(self, op: LoadOp, block: np.ndarray, report: StoreReport) -> bool:
        """Compare the checksum `read` took of these bytes (on the I/O thread that read them, in
        this load: nothing writes the row since) with the one recorded when they were written."""
        expected = int(self.sums[op.disk_slot])
        checked = self._checked.pop(op.disk_slot, None)
        if (block_checksum(block, op.key) if checked is None else checked) != expected:
            self._integrity_failure(op, report)
            return False
        report.count(Count.ONBOARD_D2D)
        if op.host_slot >= 0 and self.host is not None:
            self.host.promote(op.host_slot, block, expected)
        return True

    def _integrity_failure(self, op: LoadOp, report: StoreReport) -> None:
        report.count(Count.INTEGRITY_FAILURES)
        report.failures.append((Tier.DISK, op.disk_slot, op.key))
        if op.host_slot >= 0:
            report.failures.append((Tier.HOST, op.host_slot, op.key))
        with self._lock:  # forget it on disk too, so a restart does not offer it again
            if self._index.get(op.disk_slot, (None,))[0] == op.key:
                del self._index[op.disk_slot]
                self.journal.delete(op.key, op.disk_slot)
                self._count_journal_failure()
        self._warn(
            op.key,
            logging.WARNING,
            "KVBM: disk block %032x failed its checksum; it will be recomputed",
            op.key,
        )

    # ---- write -----------------------------------------------------------------------------------
    def write_from_host(self, ops: Sequence[OffloadOp], host: HostHandler) -> None:
        """G2 → G3; the G2 slots stay pinned by the leader until the writes are reported."""
        array = host.array
        writes = [
            _Write(
                op.key,
                op.disk_slot,
                array[op.host_slot],
                int(host.sums[op.host_slot]),
                op.host_slot,
            )
            for op in ops
        ]
        self._write_blocks(writes, counter=Count.OFFLOAD_H2D)

    def write_from_device(
        self, ops: Sequence[StoreOp], device: Device, report: StoreReport
    ) -> None:
        """G1 → G3 without G2, through staging memory held until the disk has it (bounded)."""
        rows = self.write_staging.take(len(ops))
        accepted, dropped = list(ops[: len(rows)]), list(ops[len(rows) :])
        for op in dropped:
            report.count(Count.OFFLOAD_DROPPED)
            report.failures.append((Tier.DISK, op.disk_slot, op.key))
        if not accepted:
            return
        array = self.write_staging.array
        device.to_host([op.device_block for op in accepted], array, rows)
        device.synchronize()
        writes = [
            _Write(
                op.key, op.disk_slot, array[row], block_checksum(array[row], op.key), staged_row=row
            )
            for op, row in zip(accepted, rows, strict=True)
        ]
        self._write_blocks(writes, counter=Count.OFFLOAD_D2D)

    def _write_blocks(self, writes: list[_Write], *, counter: Count) -> None:
        """Submit writes as runs of consecutive disk slots (one pwritev each). A run starts once
        every write still pending on any of its slots has finished: a slot's writes land in order."""
        for run in runs(writes, lambda w: w.slot):
            t0 = time.perf_counter()
            with self._lock:
                after = [self._writes.get(w.slot) for w in run]
                fut = self.pool.write_run(run[0].slot, [w.buf for w in run], after)
                for w in run:
                    self._writes[w.slot] = fut
            fut.add_done_callback(lambda f, run=run, t0=t0: self._written(f, run, t0, counter))

    def _written(self, f: Future, run: list[_Write], t0: float, counter: Count) -> None:
        # Bookkeeping first and unconditionally: a slot left in _writes would make flush() wait
        # forever, a missing offload ack would pin its G2 slot for good.
        exc = f.exception()
        self.write_staging.give_back(w.staged_row for w in run if w.staged_row >= 0)
        with self._lock:
            for w in run:
                if self._writes.get(w.slot) is f:
                    del self._writes[w.slot]
                if exc is None:
                    self.sums[w.slot] = w.checksum
                    self._index.pop(w.slot, None)
                    self._index[w.slot] = (w.key, w.checksum)
                else:
                    self._report.failures.append((Tier.DISK, w.slot, w.key))
                if w.host_slot >= 0:
                    self._report.offloads_done.append(w.host_slot)
            if exc is None:
                self._report.count(counter, len(run))
                self._report.durations.append(("host_to_disk", time.perf_counter() - t0))
                self._journal_puts(run)
        if exc is not None:
            log.warning("KVBM: a disk write failed; %d blocks not offloaded: %s", len(run), exc)

    def _journal_puts(self, run: Sequence[_Write]) -> None:
        """Journal written blocks (under the lock). The journal never raises: a write it cannot
        make disables it (one log line); that is counted here, once."""
        for w in run:
            self.journal.put(w.key, w.slot, w.checksum)
        if self.journal.needs_compaction():
            self.journal.compact([Entry(k, s, c) for s, (k, c) in self._index.items()])
        self._count_journal_failure()

    def _count_journal_failure(self) -> None:
        if self.journal.broken and not self._journal_counted:
            self._journal_counted = True
            self._report.count(Count.JOURNAL_FAILURES)

    # ---- reporting and lifecycle -----------------------------------------------------------------
    def take_report(self) -> StoreReport:
        with self._lock:
            report, self._report = self._report, StoreReport()
        return report

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every disk write submitted so far (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._writes.values())
            if not pending:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{len(pending)} disk writes still pending")
            futures_wait(pending, timeout=remaining)
            time.sleep(0.0005)  # let completion callbacks run

    def close(self) -> None:
        self.flush()
        with self._lock:
            self.journal.close()
        self.pool.close()
