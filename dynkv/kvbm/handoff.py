"""The handoff pool: how a prefill worker gives a prompt's KV blocks to a decode worker.

Disaggregated serving on one host (docs/disagg.md): the prefill engine computes the prompt, copies
its full blocks into its pool, and returns the pool's id and the slots in `kv_transfer_params`;
the frontend passes them to a decode engine, which reads the blocks instead of recomputing the
prompt. Each prefill worker has a pool of its own (one writer per ring): the directory named by
its id (`DYN_KVBM_HANDOFF_POOL`) inside the deployment's handoff area (`DYN_KVBM_HANDOFF_DIR`,
under /dev/shm); without an id the area itself is the one pool. A decode worker maps, read-only
and on first use, only the pools its `DYN_KVBM_HANDOFF_POOLS` lists: an id from a request is
looked up there, never turned into a path of its own. A pool is one file in shared memory:

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

from dynkv.kvbm.config import POOL_ID
from dynkv.kvbm.counters import Count
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.handlers import Device, Rows, WarnOnce
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.ops import HandoffOp, LoadOp, StoreReport, Tier
from dynkv.kvbm.paths import open_private_file, private_dir

log = logging.getLogger("dynkv.kvbm")

POOL_FILE = "handoff.bin"
RECORD = struct.Struct("<16sQ8x")  # key, checksum, pad → 32 bytes
HANDOFF_FIX = (
    "remove it if it is a leftover of yours, or choose another deployment name "
    "(--name / DYNKV_NAME; the handoff area is /dev/shm/dynkv-<name>)"
)


def handoff_slots(gb: float, stride: int) -> int:
    return max(1, int(gb * 1e9 // (stride + RECORD.size)))


def pool_dir(area: str | os.PathLike, pool_id: str) -> Path:
    """The directory of pool `pool_id` in the handoff area ("": the area itself). Only ids that
    name a plain directory inside the area are accepted (ValueError otherwise)."""
    if pool_id and not POOL_ID.fullmatch(pool_id):
        raise ValueError(f"{pool_id!r} is not a handoff pool id")
    return Path(area) / pool_id if pool_id else Path(area)


def own_pool(area: str | os.PathLike, pool_id: str, stride: int, slots: int) -> HandoffPool:
    """The pool this worker writes, created (or reused, when ours) with this geometry; the area
    it lives in is made private first (0700), like the pool directory itself."""
    if pool_id:
        private_dir(area, HANDOFF_FIX)
    return HandoffPool(pool_dir(area, pool_id), stride, slots)


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
            if not slots or size != slots * (stride + RECORD.size):
                os.close(fd)
                raise KvbmConfigError(
                    f"the handoff pool at {path} holds {size} bytes, not whole slots of "
                    f"{stride + RECORD.size}: another model's pool, or one still being created",
                    "give every worker of the deployment the same model and block size",
                )
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
    """The handoff pools as a load source (decode side) and a write target (prefill side).

    `own` is the pool this worker writes (None: a reader only); `readable` the ids of the pools a
    load may name. A pool other than its own is attached read-only the first time a load names
    it; one that cannot be attached yet (its prefill worker has not started) is a miss, retried
    on the next load."""

    tier = Tier.HANDOFF

    def __init__(
        self,
        area: str | os.PathLike,
        stride: int,
        warn: WarnOnce,
        *,
        own: tuple[str, HandoffPool] | None = None,
        readable: Sequence[str] = (),
    ) -> None:
        self.area = Path(area)
        self.stride = stride
        self.own = own[1] if own is not None else None
        self._pools: dict[str, HandoffPool] = dict([own]) if own is not None else {}
        self._readable = frozenset(readable)
        self._warn = warn
        self._unattached: set[str] = set()  # pools whose attach failure was logged
        # (pool, key, slot) -> the slot's record as read before the copy
        self._read_records: dict[tuple[str, int, int], tuple[int, int]] = {}

    @property
    def pools(self) -> dict[str, HandoffPool]:
        """The pools mapped so far, by id (the own pool first)."""
        return dict(self._pools)

    def _pool(self, pool_id: str) -> HandoffPool | None:
        if pool_id not in self._readable:  # the scheduler checked it too: defence in depth
            return None
        pool = self._pools.get(pool_id)
        if pool is None:
            try:
                pool = HandoffPool(pool_dir(self.area, pool_id), self.stride)
            except (KvbmConfigError, OSError, ValueError) as exc:
                if pool_id not in self._unattached:
                    self._unattached.add(pool_id)
                    log.warning("KVBM: cannot read handoff pool %s (%s); recomputing", pool_id, exc)
                return None
            self._unattached.discard(pool_id)
            self._pools[pool_id] = pool
        return pool

    def read(self, ops: Sequence[LoadOp], into: np.ndarray, report: StoreReport) -> Rows:
        """Copy each slot into a private row, with the record as it was read *before* the copy
        (a rewrite in between changes the bytes but not the record read: the check fails)."""
        rows: list[int | None] = []
        self._read_records.clear()
        for i, op in enumerate(ops):
            pool = self._pool(op.handoff_pool)
            if pool is None or not 0 <= op.handoff_slot < pool.slots:
                rows.append(None)
                self._missed(op, report)
                continue
            where = (op.handoff_pool, op.key, op.handoff_slot)
            self._read_records[where] = pool.read_record(op.handoff_slot)
            into[i] = pool.array[op.handoff_slot]
            rows.append(i)
        return Rows(into, rows)

    def verify(self, op: LoadOp, block: np.ndarray, report: StoreReport) -> bool:
        """`block` is the private copy: its record must name this key and match its checksum."""
        where = (op.handoff_pool, op.key, op.handoff_slot)
        key, checksum = self._read_records.get(where, (None, 0))
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
        pool = self.own
        assert pool is not None, "a handoff write needs a pool of this worker's own"
        for op in ops:
            pool.clear_record(op.slot)
        device.to_host([op.device_block for op in ops], pool.array, [op.slot for op in ops])
        device.synchronize()
        for op in ops:
            pool.write_record(op.slot, op.key, block_checksum(pool.array[op.slot], op.key))
        report.count(Count.HANDOFF_SENT, len(ops))

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
