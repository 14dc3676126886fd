"""The block store: the bytes of G2 and G3, moved as the leader's ops say, verified on load.

Runs in the vLLM worker process, next to the device KV tensors (G1). Per step:
- `load(ops, device)` (before the forward): `fetch` groups the loads by source (G2, G3, the
  handoff pool) and runs each group through its tier handler (`dynkv.kvbm.handlers`): read into
  memory only this process writes, verify those bytes (key and checksum), then copy the verified
  rows into the device blocks. Returns the device blocks that failed, so vLLM recomputes them.
  Synchronous: the forward needs the bytes.
- `store(stores, offloads, device)` (after the forward): copies completed device blocks into G2
  slots (or, without G2, into a staging buffer bound for disk), records their checksums, and
  starts disk writes. It never waits for the disk: writes complete on the pool's threads, are
  journaled once their bytes are written, and are reported to the leader in the next report.
Ordering: a read of a disk slot waits (up to the read deadline) for a write still pending on that
slot; writes to one disk slot are chained in submission order. G2 slots under a pending disk
write are pinned by the leader, so nothing overwrites them mid-write.
Guarantee: the bytes copied into a device block are the bytes that were verified — for the
shared handoff pool too, where another process may rewrite a slot at any time
(`dynkv.kvbm.handoff`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.disk_tier import MAX_RUN, MAX_STAGED_BYTES, DiskHandler
from dynkv.kvbm.handlers import (
    HOST_SAMPLE,
    Device,
    Fetched,
    HostHandler,
    Staging,
    TierHandler,
    WarnOnce,
    load_with,
    staging,
)
from dynkv.kvbm.handoff import HandoffHandler, HandoffPool, handoff_slots, own_pool
from dynkv.kvbm.journal import Entry, Journal
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.leader import tier_sizes
from dynkv.kvbm.ops import HandoffOp, LoadOp, OffloadOp, StoreOp, StoreReport, Tier

__all__ = ["MAX_RUN", "MAX_STAGED_BYTES", "BlockStore", "Device", "Fetched", "staging"]


LOAD_CHUNK_BYTES = 256 << 20  # a load is fetched and copied in chunks of about this many bytes


def _cost_loads(fetched: Fetched, copy_seconds: float) -> None:
    """Each source's load cost (`StoreReport.loads`) gets its share of the device copy, by blocks."""
    loads = fetched.report.loads
    blocks = sum(n for _, n, _ in loads)
    if blocks:
        share = copy_seconds / blocks
        loads[:] = [(tier, n, s + n * share) for tier, n, s in loads]


def source(op: LoadOp) -> Tier:
    """The tier a load reads from (a G3 hit with a G2 promotion slot still reads the disk)."""
    if op.from_handoff:
        return Tier.HANDOFF
    return Tier.DISK if op.from_disk else Tier.HOST


class BlockStore:
    def __init__(
        self, layout: BlockLayout, settings: KvbmSettings, *, pin_memory: bool = False
    ) -> None:
        self.layout = layout
        self.stride = layout.slot_stride
        host_slots, disk_slots = tier_sizes(layout, settings)
        warn = WarnOnce()
        self.staging = Staging(self.stride)
        self.handlers: dict[Tier, TierHandler] = {}
        self._host: HostHandler | None = None
        self._disk: DiskHandler | None = None
        self._handoff: HandoffHandler | None = None
        if host_slots:
            sample = HOST_SAMPLE if settings.host_verify == "sampled" else 1
            self._host = HostHandler(
                host_slots,
                self.stride,
                pin_memory=pin_memory,
                warn=warn,
                sample=sample,
                prefault=settings.host_prefault,
            )
            self.handlers[Tier.HOST] = self._host
        if disk_slots:
            self._disk = DiskHandler(
                settings,
                disk_slots,
                self.stride,
                layout.fingerprint(),
                host=self._host,
                staging=self.staging,
                warn=warn,
            )
            self.handlers[Tier.DISK] = self._disk
        if settings.handoff_dir is not None:
            # the writer creates its pool at start, with the geometry every reader expects;
            # pools of other workers are attached when a load first names them (start order
            # does not matter either way)
            own = None
            try:
                if settings.writes_handoff:
                    pool_id = settings.handoff_pool or ""
                    own = (
                        pool_id,
                        own_pool(
                            settings.handoff_dir,
                            pool_id,
                            self.stride,
                            handoff_slots(settings.handoff_gb, self.stride),
                        ),
                    )
            except BaseException:
                if self._disk is not None:
                    self._disk.close()
                raise
            self._handoff = HandoffHandler(
                settings.handoff_dir,
                self.stride,
                warn,
                own=own,
                readable=settings.readable_pools,
            )
            self.handlers[Tier.HANDOFF] = self._handoff
        self._lock = threading.Lock()
        self._report = StoreReport()

    # ---- the media, for the worker's start-up line, benchmarks and tests -------------------------
    @property
    def host(self):
        return self._host.pool if self._host is not None else None

    @property
    def host_sums(self) -> np.ndarray:
        return self._host.sums if self._host is not None else np.zeros(0, dtype=np.uint64)

    @property
    def disk(self) -> DiskPool | None:
        return self._disk.pool if self._disk is not None else None

    @property
    def journal(self) -> Journal | None:
        return self._disk.journal if self._disk is not None else None

    @property
    def disk_entries(self) -> list[Entry]:
        return self._disk.entries if self._disk is not None else []

    @property
    def handoff(self) -> HandoffPool | None:
        """The handoff pool this worker writes (None: none, or a reader only)."""
        return self._handoff.own if self._handoff is not None else None

    @property
    def handoff_pools(self) -> dict[str, HandoffPool]:
        """Every handoff pool mapped so far, by id (its own, and those loads have read)."""
        return self._handoff.pools if self._handoff is not None else {}

    # ---- load --------------------------------------------------------------------------------------
    def load(self, ops: Sequence[LoadOp], device: Device) -> list[int]:
        """Onboard `ops` into the device; returns the device blocks that could not be loaded."""
        failed: list[int] = []
        step = max(1, LOAD_CHUNK_BYTES // self.stride)
        for first in range(0, len(ops), step):  # bounded staging memory, however long the prompt
            fetched = self.fetch(ops[first : first + step])
            t1 = time.perf_counter()
            for array, rows, blocks in fetched.copies:
                device.from_host(array, rows, blocks)
            device.synchronize()
            copy = time.perf_counter() - t1
            fetched.report.durations.append(("host_to_device", copy))
            _cost_loads(fetched, copy)
            with self._lock:
                self._report.merge(fetched.report)
            failed += fetched.failed
        return failed

    def fetch(self, ops: Sequence[LoadOp]) -> Fetched:
        """The host half of a load: each source's handler reads and verifies its blocks. Returns
        what to copy into the device and what failed; nothing is reported until `load` merges
        the result (the bench calls this alone to time G3→G2)."""
        groups: dict[Tier, list[LoadOp]] = {}
        for op in ops:
            groups.setdefault(source(op), []).append(op)
        private = len(ops) - len(groups.get(Tier.HOST, ()))
        rows, keep = self.staging.take(private) if private else (None, None)
        fetched = Fetched(keep=keep)
        first = 0  # the next free staging row
        for tier, tier_ops in groups.items():
            handler = self.handlers.get(tier)
            if handler is None:  # a plan for a tier this store lacks: nothing to read it from
                fetched.failed.extend(op.device_block for op in tier_ops)
                continue
            t0 = time.perf_counter()
            into = rows[first : first + len(tier_ops)] if tier is not Tier.HOST else None
            failed_before = len(fetched.failed)
            load_with(handler, tier_ops, into, fetched)  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            # the cost per block delivered: a read deadline caps the time, not the slowness (a
            # load that delivered nothing in 5 s cost 5 s for one block's worth, at least)
            delivered = len(tier_ops) - (len(fetched.failed) - failed_before)
            fetched.report.loads.append((tier, max(delivered, 1), seconds))
            if tier is Tier.DISK:
                fetched.report.durations.append(("disk_to_host", seconds))
            if tier is not Tier.HOST:
                first += len(tier_ops)
        return fetched

    # ---- store -------------------------------------------------------------------------------------
    def store(
        self, stores: Sequence[StoreOp], offloads: Sequence[OffloadOp], device: Device
    ) -> None:
        """Copy completed device blocks out (synchronously), then start disk writes."""
        report = StoreReport()
        to_host = [op for op in stores if op.host_slot >= 0]
        to_disk = [op for op in stores if op.host_slot < 0 and op.disk_slot >= 0]
        if to_host:
            assert self._host is not None
            self._host.write(to_host, device, report)
        if to_disk:
            assert self._disk is not None
            self._disk.write_from_device(to_disk, device, report)
        if offloads:
            assert self._host is not None and self._disk is not None
            self._disk.write_from_host(offloads, self._host)
        with self._lock:
            self._report.merge(report)

    def write_handoff(self, ops: Sequence[HandoffOp], device: Device) -> None:
        """Prefill side: copy prompt blocks into the shared pool (synchronous; host memory)."""
        if not ops:
            return
        assert self._handoff is not None
        report = StoreReport()
        self._handoff.write(ops, device, report)
        with self._lock:
            self._report.merge(report)

    # ---- reporting and lifecycle -------------------------------------------------------------------
    def add_report(self, report: StoreReport) -> None:
        """What the worker reports for the store (ops it discarded) goes out with the rest."""
        with self._lock:
            self._report.merge(report)

    def take_report(self) -> StoreReport:
        with self._lock:
            report, self._report = self._report, StoreReport()
        if self._disk is not None:
            report.merge(self._disk.take_report())
        return report

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every disk write submitted so far (tests, benchmarks, shutdown)."""
        if self._disk is not None:
            self._disk.flush(timeout)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
        if self._handoff is not None:
            self._handoff.close()
