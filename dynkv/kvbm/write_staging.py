"""Rows that G1→G3 writes wait in (a disk tier without G2) until the disk has them, reused.

A store without G2 copies the step's blocks out of vLLM's KV into private memory, inside the
request's step, and the disk pool's threads write them from there. That memory was a fresh
mapping per store, so the kernel committed each 4 KB page at its first write, in the step: a
3,600-token prompt of the bench model (33 MB) spent 53 ms in that copy against 3 ms for the same
copy into committed pages (docs/kvbm.md#g3-without-g2).

Here one mapping of `capacity` rows lives as long as the store. Rows go back to a free list when
their write completes and the lowest free rows are handed out first, so a worker's stores keep
landing in the pages its earlier stores committed: its resident set grows to the most bytes ever
waiting for the disk at once (one prompt's worth when the disk keeps up), never past `capacity`.
Rows are never taken back while a write may still read them: a write has no deadline, it
completes or fails, and only then is its row free.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable

import numpy as np

from dynkv.kvbm.handlers import staging


class WriteStaging:
    def __init__(self, capacity_bytes: int, stride: int) -> None:
        self.stride = stride
        self.capacity = max(1, capacity_bytes // stride)
        self._array: np.ndarray | None = None  # mapped at the first store: G2 stores never need it
        self._mapping: object = None
        self._free = list(range(self.capacity))  # a heap: the lowest rows were committed first
        self._lock = threading.Lock()

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array, self._mapping = staging(self.capacity, self.stride)
        return self._array

    def take(self, wanted: int) -> list[int]:
        """Up to `wanted` free rows, lowest first (fewer when writes already hold the rest)."""
        with self._lock:
            return [heapq.heappop(self._free) for _ in range(min(wanted, len(self._free)))]

    def give_back(self, rows: Iterable[int]) -> None:
        with self._lock:
            for row in rows:
                heapq.heappush(self._free, row)

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)
