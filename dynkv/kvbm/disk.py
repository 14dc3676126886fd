"""G3 storage: one preallocated pool file of block slots, read and written by a thread pool.

- The directory is created private (0700) and the pool file 0600; an existing directory or file
  is reused only when it is ours and closed to other users, never through a symlink
  (dynkv/kvbm/paths.py, docs/security.md "Shared paths"); an exclusive `flock` on the
  directory's lock file keeps two engines from sharing one pool (they would overwrite each
  other's blocks).
- Preallocation uses the real `fallocate(2)`: where the filesystem lacks it the pool is
  zero-filled only if DYN_KVBM_DISK_ZEROFILL_FALLBACK is set, else start-up fails naming it.
- O_DIRECT (no double caching in the page cache, predictable latency) unless
  DYN_KVBM_DISK_DISABLE_O_DIRECT; a filesystem that refuses it (EINVAL) fails start-up naming the
  variable. Slots are 4096-aligned and the buffers come from page-aligned host memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

from dynkv.kvbm.diskio import fallocate, fallocate_unsupported, zero_fill
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.paths import open_private_file, private_dir

log = logging.getLogger("dynkv.kvbm")

POOL_FILE = "blocks.bin"
LOCK_FILE = ".lock"
_UNSAFE_FIX = (
    "remove it if it is a leftover of yours, or set DYN_KVBM_DISK_CACHE_DIR to a directory "
    "of your own"
)


class DiskPool:
    def __init__(
        self,
        directory: str | os.PathLike,
        slots: int,
        stride: int,
        *,
        o_direct: bool = True,
        zerofill_fallback: bool = False,
        io_threads: int = 4,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.slots = slots
        self.stride = stride
        self.o_direct = o_direct
        self._lock_fd = -1
        self._fd = -1
        self._make_private_dir()
        self._take_lock()
        try:
            self.reused = self._open_pool(zerofill_fallback)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvbm-disk")

    @property
    def path(self) -> Path:
        return self.directory / POOL_FILE

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride

    # ---- set-up --------------------------------------------------------------------------------
    def _make_private_dir(self) -> None:
        try:
            private_dir(self.directory, _UNSAFE_FIX)
        except OSError as exc:
            raise KvbmConfigError(
                f"cannot create the disk cache directory {self.directory}: {exc.strerror}",
                "set DYN_KVBM_DISK_CACHE_DIR to a writable directory",
            ) from None

    def _take_lock(self) -> None:
        path = self.directory / LOCK_FILE
        self._lock_fd, _ = open_private_file(path, os.O_RDWR, _UNSAFE_FIX)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise KvbmConfigError(
                f"the disk cache directory {self.directory} is in use by another process "
                f"(pid {owner}); two engines cannot share one pool",
                "give each worker its own DYN_KVBM_DISK_CACHE_DIR",
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)

    def _open_pool(self, zerofill_fallback: bool) -> bool:
        """Open (and if needed create and preallocate) the pool; True when an existing pool of
        the right size was reused (its blocks may be valid: the journal decides)."""
        path = self.path
        flags = os.O_RDWR
        if self.o_direct:
            flags |= os.O_DIRECT
        try:
            self._fd, created = open_private_file(path, flags, _UNSAFE_FIX)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.o_direct:
                raise KvbmConfigError(
                    f"the filesystem of {self.directory} refuses O_DIRECT (EINVAL)",
                    "export DYN_KVBM_DISK_DISABLE_O_DIRECT=true, or use a directory on ext4/xfs",
                ) from None
            raise KvbmConfigError(
                f"cannot open {path}: {exc.strerror}",
                "set DYN_KVBM_DISK_CACHE_DIR to a writable directory",
            ) from None
        if not created and os.fstat(self._fd).st_size == self.nbytes:
            return True
        os.ftruncate(self._fd, 0)
        try:
            fallocate(self._fd, self.nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise KvbmConfigError(
                    f"not enough free space in {self.directory} for a "
                    f"{self.nbytes / 1e9:.2f} GB disk pool",
                    "lower DYN_KVBM_DISK_CACHE_GB or point DYN_KVBM_DISK_CACHE_DIR elsewhere",
                ) from None
            if not fallocate_unsupported(exc):
                raise
            if not zerofill_fallback:
                raise KvbmConfigError(
                    f"the filesystem of {self.directory} does not support fallocate(2) "
                    f"({errno.errorcode.get(exc.errno, exc.errno)})",
                    "export DYN_KVBM_DISK_ZEROFILL_FALLBACK=true (preallocate by writing zeros), "
                    "or use a directory on ext4/xfs/tmpfs",
                ) from None
            log.warning(
                "KVBM: %s lacks fallocate(2); zero-filling %.2f GB (DYN_KVBM_DISK_ZEROFILL_FALLBACK)",
                self.directory,
                self.nbytes / 1e9,
            )
            self._zero_fill_or_explain()
        return False

    def _zero_fill_or_explain(self) -> None:
        """The zero-fill fallback; a disk too small for the pool is a configuration error, and
        the half-written pool is given back (truncated) rather than left filling the disk."""
        try:
            self._zero_fill()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            raise KvbmConfigError(
                f"not enough free space in {self.directory} for a "
                f"{self.nbytes / 1e9:.2f} GB disk pool (ran out while zero-filling it)",
                "lower DYN_KVBM_DISK_CACHE_GB or point DYN_KVBM_DISK_CACHE_DIR elsewhere",
            ) from None

    def _zero_fill(self) -> None:
        if not self.o_direct:
            zero_fill(self._fd, self.nbytes)
            return
        # O_DIRECT writes need aligned buffers: write from an aligned zero page run
        import mmap

        chunk = min(self.nbytes, 8 << 20)
        buf = mmap.mmap(-1, chunk)
        done = 0
        while done < self.nbytes:
            n = min(chunk, self.nbytes - done)
            done += os.pwrite(self._fd, memoryview(buf)[:n], done)
        os.fsync(self._fd)

    # ---- I/O -----------------------------------------------------------------------------------
    def write(self, slot: int, buf, after: Future | None = None) -> Future:
        """Write one slot (`buf`: a C-contiguous, aligned buffer of `stride` bytes), once `after`
        (an earlier write to the same slot) has finished, so writes to a slot land in order."""
        return self.write_run(slot, [buf], () if after is None else (after,))

    def read(self, slot: int, buf) -> Future:
        """Read one slot into `buf` (C-contiguous, aligned, `stride` bytes)."""
        return self.read_run(slot, [buf])

    def write_run(self, first_slot: int, bufs: Sequence, after: Iterable[Future] = ()) -> Future:
        """Write consecutive slots from `bufs` (one buffer per slot, anywhere in memory) with one
        pwritev, once every future in `after` has finished: few large requests, not many small."""
        after = [f for f in after if f is not None]

        def task() -> None:
            if after:
                futures_wait(after)
            self._io(os.pwritev, first_slot, bufs)

        return self._pool.submit(task)

    def read_run(
        self, first_slot: int, bufs: Sequence, then: Callable[[int], Any] | None = None
    ) -> Future:
        """Read consecutive slots into `bufs` (one buffer per slot) with one preadv. The future's
        result is `(n, then(n))`, n being how many leading slots were read whole (fewer than
        asked: a truncated file): `then` works on the bytes just read on the same I/O thread
        (the G3 handler checksums them there, so the checks of several runs, and of one run and
        the read of the next, run in parallel)."""

        def task() -> tuple[int, Any]:
            n = self._io(os.preadv, first_slot, bufs, False)
            return n, (then(n) if then is not None else None)

        return self._pool.submit(task)

    def _io(self, call, first_slot: int, bufs: Sequence, whole: bool = True) -> int:
        self._check(first_slot)
        self._check(first_slot + len(bufs) - 1)
        views = [memoryview(b).cast("B") for b in bufs]
        want = self.stride * len(views)
        done = call(self._fd, views, first_slot * self.stride)
        if done != want and whole:
            raise OSError(errno.EIO, f"short I/O at slot {first_slot}: {done}/{want} bytes")
        return done // self.stride

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} outside 0..{self.slots - 1}")

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1
