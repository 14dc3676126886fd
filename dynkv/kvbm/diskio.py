"""Thin, honest wrappers around the two filesystem features the disk tier depends on.

`os.posix_fallocate` cannot tell whether a filesystem supports preallocation: glibc silently
emulates it by writing zeros. The disk tier wants to know (zero-filling a large pool is slow and
must be opted into with DYN_KVBM_DISK_ZEROFILL_FALLBACK), so `fallocate` here calls the real
`fallocate(2)` syscall through libc and raises the kernel's errno (EOPNOTSUPP on ramfs).
O_DIRECT needs buffers, offsets and sizes aligned to the logical block size; `ALIGN` is the
conservative 4096 that covers 512e and 4Kn devices.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

ALIGN = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, length: int, offset: int = 0) -> None:
    """Reserve `length` bytes at `offset` with the real syscall; OSError(errno) when refused."""
    if _libc.fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate_unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def zero_fill(fd: int, length: int, chunk: int = 8 << 20) -> None:
    """Preallocate by writing zeros (the opt-in fallback), then make it durable."""
    zeros = bytes(min(chunk, length))
    done = 0
    while done < length:
        n = os.pwrite(fd, zeros[: min(chunk, length - done)], done)
        done += n
    os.fsync(fd)


def open_direct(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """open(2) with O_DIRECT; EINVAL means the filesystem refuses direct I/O."""
    return os.open(path, flags | os.O_DIRECT, mode)


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer of `size` rounded up to ALIGN (mmap is page aligned)."""
    return mmap.mmap(-1, round_up(size))


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def probe_fallocate(directory: str | os.PathLike, length: int = 1 << 20) -> OSError | None:
    """None when `directory`'s filesystem supports fallocate(2), else the OSError it raised."""
    path = os.path.join(directory, f".dynkv-probe-fallocate-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        fallocate(fd, length)
        return None
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        os.unlink(path)


def probe_o_direct(directory: str | os.PathLike) -> OSError | None:
    """None when files in `directory` can be opened and written with O_DIRECT, else the error."""
    path = os.path.join(directory, f".dynkv-probe-odirect-{os.getpid()}")
    fd = -1
    try:
        fd = open_direct(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
        buf = aligned_buffer(ALIGN)
        os.pwrite(fd, buf, 0)
        return None
    except OSError as exc:
        return exc
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(path):
            os.unlink(path)
