"""A slow G3 device for benchmarks and tests: every disk-pool read takes `delay_ms` longer per block.

Where the kernel lets us (root, device-mapper `delay`, or cgroup `io.max` on a loop device) a slow
disk is best made below the filesystem. Where it does not, this is the next most honest place:
the delay is spent inside the disk pool's own I/O threads, just before the `preadv`, so a
delayed read holds its thread exactly as a slow device would (reads queue behind each other and
behind writes), and the runtime above sees nothing but a slower disk — its deadline, its timing
and its onboard policy run unchanged.

The runtime itself has no hook for this (docs/onboard-policy.md): `install` wraps
`dynkv.kvbm.disk.DiskPool._io` in the process that calls it, so it must run in the process that
holds the disk pool (vLLM's worker; the benchmark and the e2e driver run the engine in their own
process for that). `uninstall` restores the pool.
"""

from __future__ import annotations

import os
import time

from dynkv.kvbm.disk import DiskPool

_ORIGINAL = DiskPool._io


def install(delay_ms: float) -> None:
    """From now on, each G3 read of n blocks sleeps n × `delay_ms` in its I/O thread first."""
    delay = delay_ms / 1000

    def slow_io(self: DiskPool, call, first_slot: int, bufs, whole: bool = True) -> int:
        if call is os.preadv and delay > 0:
            time.sleep(delay * len(bufs))
        return _ORIGINAL(self, call, first_slot, bufs, whole)

    DiskPool._io = slow_io  # type: ignore[method-assign]


def uninstall() -> None:
    DiskPool._io = _ORIGINAL  # type: ignore[method-assign]
