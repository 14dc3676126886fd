"""Tier handlers: how the block store reads, verifies and writes each medium.

The store (`dynkv.kvbm.store`) keeps no per-medium logic of its own: every source a load can come
from is a `TierHandler` — the host pool (G2, `HostHandler`), the disk pool (G3 with promotion into
G2, `dynkv.kvbm.disk_tier.DiskHandler`) and the shared handoff pool
(`dynkv.kvbm.handoff.HandoffHandler`) — and `Staging` is the private memory that disk and handoff
reads land in. `load_with` runs one group of a step's loads through its handler:

1. `read` puts each block's bytes into memory this process alone writes (G2 already is; disk and
   handoff blocks are copied into `Staging` rows) and says which rows could not be read;
2. `verify` checks *those* bytes — the key they were stored under and their checksum — and, on
   success, records where the block now lives (a G3 block is promoted into its G2 slot);
3. what passed is handed to the device copy, from the very rows that were verified.

So the bytes that reach the device are the bytes that were verified, whatever another process or
a late disk read does to the shared pool or the disk afterwards. Each handler also owns the write
side of its medium (device → G2, G2/G1 → G3, device → handoff pool).
"""

from __future__ import annotations

import logging
import mmap
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dynkv.kvbm.counters import Count
from dynkv.kvbm.host import HostArray
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.ops import LoadOp, StoreOp, StoreReport, Tier

log = logging.getLogger("dynkv.kvbm")


class WarnOnce:
    """One log line per block key, however often the block fails (a hot prefix fails often)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def __call__(self, key: int, level: int, message: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.log(level, message, *args)


class Device(Protocol):
    """G1 as seen by the store (implemented by `dynkv.kvbm.device.DeviceKV`)."""

    def to_host(self, block_ids: Sequence[int], array: np.ndarray, rows: Sequence[int]) -> None: ...

    def from_host(
        self, array: np.ndarray, rows: Sequence[int], block_ids: Sequence[int]
    ) -> None: ...

    def synchronize(self) -> None: ...


@dataclass
class Rows:
    """Where `read` left each op's bytes: a row of `array`, or None when it could not be read
    (already counted and reported by the handler)."""

    array: np.ndarray | None
    rows: list[int | None]


@dataclass
class Fetched:
    """Verified blocks ready for the device: (array, rows, device blocks) per source array."""

    copies: list[tuple[np.ndarray, list[int], list[int]]] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    report: StoreReport = field(default_factory=StoreReport)
    keep: object = None  # staging memory the rows live in


class TierHandler(Protocol):
    """A load source. `read` and `verify` may count and report into `report`."""

    tier: Tier

    def read(self, ops: Sequence[LoadOp], into: np.ndarray, report: StoreReport) -> Rows: ...

    def verify(self, op: LoadOp, block: np.ndarray, report: StoreReport) -> bool: ...


def load_with(
    handler: TierHandler, ops: Sequence[LoadOp], into: np.ndarray, fetched: Fetched
) -> None:
    """Read, verify, and queue for the device what passed; the rest goes to `fetched.failed`."""
    read = handler.read(ops, into, fetched.report)
    good_rows: list[int] = []
    good_blocks: list[int] = []
    for op, row in zip(ops, read.rows, strict=True):
        if row is not None and handler.verify(op, read.array[row], fetched.report):
            good_rows.append(row)
            good_blocks.append(op.device_block)
        else:
            fetched.failed.append(op.device_block)
    if good_rows:
        fetched.copies.append((read.array, good_rows, good_blocks))


def staging(rows: int, stride: int) -> tuple[np.ndarray, mmap.mmap]:
    """Page-aligned rows (O_DIRECT-ready) outside the G2 pool."""
    mm = mmap.mmap(-1, max(rows, 1) * stride)
    return np.frombuffer(mm, dtype=np.uint8).reshape(max(rows, 1), stride), mm


class Staging:
    """Private rows that disk and handoff reads land in before they are verified.

    Loads run one at a time (before each forward), so one buffer is reused: a fresh mapping per
    load would fault in every page again (a 33 MB prompt: ~8,000 page faults). A load whose disk
    reads missed their deadline `abandon`s the buffer: those reads may still land in it, so the
    next load gets new memory and the late bytes reach nothing anyone reads."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self._buffer: tuple[np.ndarray, mmap.mmap] | None = None

    def take(self, rows: int) -> tuple[np.ndarray, object]:
        if self._buffer is None or self._buffer[0].shape[0] < rows:
            self._buffer = staging(max(rows, 64), self.stride)
        return self._buffer[0][:rows], self._buffer[1]

    def abandon(self) -> None:
        self._buffer = None


HOST_SAMPLE = 8  # sampled G2 verification: one block in this many, at a random phase per load


class HostHandler:
    """G2: a block is read in place (the pool is this process's memory, written only by this
    store, and its slot is pinned for the step) and verified against the checksum recorded when
    it was stored — every block (`always`), or a random one in `HOST_SAMPLE` of each load
    (`sampled`, the default: nothing but this store writes the pool, so what a check guards
    against is a bug that puts a block in the wrong slot or leaves it unwritten, and such a bug
    hits many blocks; a sample catches it on the first load at an eighth of the cost)."""

    tier = Tier.HOST

    def __init__(
        self,
        slots: int,
        stride: int,
        *,
        pin_memory: bool,
        warn: WarnOnce,
        sample: int = 1,
        prefault: bool = False,
    ) -> None:
        self.pool = HostArray(slots, stride, pin=pin_memory, prefault=prefault)
        self.sums = np.zeros(slots, dtype=np.uint64)
        self._warn = warn
        self._sample = max(1, sample)
        self._due: list[bool] = []  # which of the current load's blocks to verify, in order

    @property
    def array(self) -> np.ndarray:
        return self.pool.array

    def read(self, ops: Sequence[LoadOp], into: np.ndarray, report: StoreReport) -> Rows:
        phase = random.randrange(self._sample)
        due = [(i + phase) % self._sample == 0 for i in range(len(ops))]
        if due and not any(due):  # a short load still checks one block
            due[random.randrange(len(due))] = True
        self._due = due[::-1]  # popped in op order by verify
        return Rows(self.pool.array, [op.host_slot for op in ops])

    def verify(self, op: LoadOp, block: np.ndarray, report: StoreReport) -> bool:
        due = self._due.pop() if self._due else True
        if due and block_checksum(block, op.key) != int(self.sums[op.host_slot]):
            report.count(Count.INTEGRITY_FAILURES)
            report.failures.append((Tier.HOST, op.host_slot, op.key))
            self._warn(
                op.key,
                logging.WARNING,
                "KVBM: host block %032x failed its checksum; it will be recomputed",
                op.key,
            )
            return False
        report.count(Count.ONBOARD_H2D)
        return True

    def promote(self, slot: int, block: np.ndarray, checksum: int) -> None:
        """A verified G3 block becomes a G2 block (its promotion slot was reserved for it)."""
        self.pool.array[slot] = block
        self.sums[slot] = checksum

    def write(self, ops: Sequence[StoreOp], device: Device, report: StoreReport) -> None:
        """Device → G2 (synchronous), recording each block's checksum."""
        t0 = time.perf_counter()
        array = self.pool.array
        device.to_host([op.device_block for op in ops], array, [op.host_slot for op in ops])
        device.synchronize()
        for op in ops:
            self.sums[op.host_slot] = block_checksum(array[op.host_slot], op.key)
        report.count(Count.OFFLOAD_D2H, len(ops))
        report.durations.append(("device_to_host", time.perf_counter() - t0))
