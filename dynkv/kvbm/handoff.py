"""The handoff pool: how a prefill worker gives a prompt's KV blocks to a decode worker.

Disaggregated serving on one host (docs/disagg.md): the prefill engine computes the prompt, copies
its full blocks into this pool, and returns the slots in `kv_transfer_params`; the frontend passes
them to the decode engine, which reads the blocks instead of recomputing the prompt. The pool is
one file in shared memory (`DYN_KVBM_HANDOFF_DIR`, under /dev/shm), mapped by both processes:

    [slots × stride bytes of block data][slots × 32-byte slot records: key (16), checksum (8)]

It is a ring: the producer reuses the least recently written slot, so a request that never
reaches decode leaks nothing — its blocks are simply overwritten, possibly while a decode reads
them. The producer clears a slot's record before rewriting its data and writes the new record
after.

What the reader (`HandoffHandler`) guarantees: a block reaches the decode's device only as bytes
copied out of the pool into the decode's private memory *and verified there*: the slot's record
names the key the decode computed from its own prompt, and the private copy matches the record's
checksum (seeded with the key). The device copy then reads the private copy, never the shared
mapping. A slot rewritten, cleared or torn at any moment before the private copy is complete
fails that check (a miss: the block is recomputed, `kvbm_handoff_blocks_missed_total`); a slot
rewritten after it no longer matters. The residual risk is a 64-bit checksum collision between
the bytes the reader copied and the record it read.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynkv.kvbm.counters import Count
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.handlers import Device, Rows, WarnOnce
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.ops import HandoffOp, LoadOp, StoreReport, Tier
from dynkv.kvbm.paths import open_private_file, private_dir

POOL_FILE = "handoff.bin"
RECORD = struct.Struct("<16sQ8x")  # key, checksum, pad → 32 bytes
HANDOFF_FIX = (
    "remove it if it is a leftover of yours, or choose another deployment name "
    "(--name / DYNKV_NAME; the pool is /dev/shm/dynkv-<name>)"
)


def handoff_slots(gb: float, stride: int) -> int:
    return max(1, int(gb * 1e9 // (stride + RECORD.size)))


class HandoffPool:
    """The mapped pool. The producer creates it (0600 in a 0700 directory); consumers attach.
    Both refuse a directory or file that is not ours (dynkv/kvbm/paths.py): a pool planted by
    another user would hand them its blocks, or take ours."""

    def __init__(self, directory: str | os.PathLike, stride: int, slots: int | None = None) -> None:
        self.directory = Path(directory)
        self.stride = stride
        path = self.directory / POOL_FILE
        create = slots is not None
        if create:
            private_dir(self.directory, HANDOFF_FIX)
            fd, _ = open_private_file(path, os.O_RDWR, HANDOFF_FIX)
            size = slots * (stride + RECORD.size)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        else:
            try:
                private_dir(self.directory, HANDOFF_FIX, create=False)
                fd, _ = open_private_file(path, os.O_RDONLY, HANDOFF_FIX, create=False)
            except FileNotFoundError:
                raise KvbmConfigError(
                    f"no handoff pool at {path}: the prefill worker has not created it",
                    "start the prefill worker with the same DYN_KVBM_HANDOFF_DIR",
                ) from None
            size = os.fstat(fd).st_size
            slots = size // (stride + RECORD.size)
        try:
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.slots = slots
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        self.array = buf[: slots * stride].reshape(slots, stride)
        self._records = memoryview(self._mm)[slots * stride :]
        self.writable = create

    def write_record(self, slot: int, key: int, checksum: int) -> None:
        RECORD.pack_into(self._records, slot * RECORD.size, key.to_bytes(16, "little"), checksum)

    def read_record(self, slot: int) -> tuple[int, int]:
        key, checksum = RECORD.unpack_from(self._records, slot * RECORD.size)
        return int.from_bytes(key, "little"), checksum

    def clear_record(self, slot: int) -> None:
        """Before a slot is rewritten: a reader in between sees no valid block, not a mix."""
        RECORD.pack_into(self._records, slot * RECORD.size, bytes(16), 0)

    def close(self) -> None:
        self._records.release()
        self.array = None  # type: ignore[assignment]
        # a numpy view may still be alive somewhere: then the mapping goes with it
        with contextlib.suppress(BufferError):
            self._mm.close()


class HandoffHandler:
    """The handoff pool as a load source (decode side) and a write target (prefill side)."""

    tier = Tier.HANDOFF

    def __init__(self, pool: HandoffPool, warn: WarnOnce) -> None:
        self.pool = pool
        self._warn = warn
        self._read_records: dict[tuple[int, int], tuple[int, int]] = {}  # (key, slot) -> its record

    def read(self, ops: Sequence[LoadOp], into: np.ndarray, report: StoreReport) -> Rows:
        """Copy each slot into a private row, with the record as it was read *before* the copy
        (a rewrite in between changes the bytes but not the record read: the check fails)."""
        rows: list[int | None] = []
        self._read_records.clear()
        for i, op in enumerate(ops):
            if not 0 <= op.handoff_slot < self.pool.slots:
                rows.append(None)
                self._missed(op, report)
                continue
            self._read_records[op.key, op.handoff_slot] = self.pool.read_record(op.handoff_slot)
            into[i] = self.pool.array[op.handoff_slot]
            rows.append(i)
        return Rows(into, rows)

    def verify(self, op: LoadOp, block: np.ndarray, report: StoreReport) -> bool:
        """`block` is the private copy: its record must name this key and match its checksum."""
        key, checksum = self._read_records.get((op.key, op.handoff_slot), (None, 0))
        if key != op.key or block_checksum(block, op.key) != checksum:
            self._missed(op, report)
            return False
        report.count(Count.HANDOFF_RECEIVED)
        return True

    def _missed(self, op: LoadOp, report: StoreReport) -> None:
        report.count(Count.HANDOFF_MISSED)
        report.failures.append((Tier.HANDOFF, op.handoff_slot, op.key))
        self._warn(
            op.key,
            logging.INFO,
            "KVBM: handed-off block %032x is gone from the handoff pool (expired or rewritten); "
            "recomputing it",
            op.key,
        )

    def write(self, ops: Sequence[HandoffOp], device: Device, report: StoreReport) -> None:
        """Prefill side: copy prompt blocks into the shared pool (synchronous; host memory).
        Records are cleared first and written last, so a reader never pairs old with new."""
        pool = self.pool
        for op in ops:
            pool.clear_record(op.slot)
        device.to_host([op.device_block for op in ops], pool.array, [op.slot for op in ops])
        device.synchronize()
        for op in ops:
            pool.write_record(op.slot, op.key, block_checksum(pool.array[op.slot], op.key))
        report.count(Count.HANDOFF_SENT, len(ops))
