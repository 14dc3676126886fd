"""The handoff pool: how a prefill worker gives a prompt's KV blocks to a decode worker.

Disaggregated serving on one host (docs/disagg.md): the prefill engine computes the prompt, copies its
full blocks into this pool, and returns the slots in `kv_transfer_params`; the frontend passes them
to the decode engine, which reads the blocks instead of recomputing the prompt. The pool is one
file in shared memory (`DYN_KVBM_HANDOFF_DIR`, under /dev/shm), mapped by both processes:

    [slots × stride bytes of block data][slots × 32-byte slot records: key (16), checksum (8)]

It is a ring: the producer reuses the least recently written slot, so a request that never
reaches decode leaks nothing — its blocks are simply overwritten. A reader trusts nothing it
cannot verify: the record's key must be the key the decode computed from its own prompt, and the
data must match the record's checksum (seeded with the key). A slot overwritten or torn under the
reader fails that check and the block is recomputed, never used.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from dynkv.kvbm.errors import KvbmConfigError

POOL_FILE = "handoff.bin"
RECORD = struct.Struct("<16sQ8x")  # key, checksum, pad → 32 bytes


def handoff_slots(gb: float, stride: int) -> int:
    return max(1, int(gb * 1e9 // (stride + RECORD.size)))


class HandoffPool:
    """The mapped pool. The producer creates it (0600 in a 0700 directory); consumers attach."""

    def __init__(self, directory: str | os.PathLike, stride: int, slots: int | None = None) -> None:
        self.directory = Path(directory)
        self.stride = stride
        path = self.directory / POOL_FILE
        create = slots is not None
        if create:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            size = slots * (stride + RECORD.size)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        else:
            try:
                fd = os.open(path, os.O_RDONLY)
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
