"""The disk tier (G3): a private, writable directory with room for the pool, on a filesystem that
does what the runtime asks (fallocate(2), O_DIRECT) or with the fallback variables set.

The probes are the runtime's own (`dynkv.kvbm.diskio`), run for real in the configured directory:
`os.posix_fallocate` would lie (glibc zero-fills), and O_DIRECT support is per filesystem.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, gb, ok, warn
from dynkv.kvbm import diskio
from dynkv.kvbm.config import KvbmSettings

ZEROFILL = "DYN_KVBM_DISK_ZEROFILL_FALLBACK"
NO_O_DIRECT = "DYN_KVBM_DISK_DISABLE_O_DIRECT"
NO_FILTER = "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"
MEMORY_FS = {"ramfs", "tmpfs"}


def filesystem_of(path: Path) -> tuple[str, str]:
    """(fstype, mount point) of the mount holding `path`, from /proc/mounts (longest prefix)."""
    best = ("?", "/")
    target = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[1]):
            best = (fields[2], mnt)
    return best


def disk_dir(ctx: DoctorContext) -> Outcome | None:
    if not ctx.kvbm.has_disk_tier:
        return None
    state = ctx.disk_dir
    if not state.ok:
        fix = (
            f"sudo chown -R $(id -u):$(id -g) {state.path}   # or export DYN_KVBM_DISK_CACHE_DIR=<a writable dir>"
            if "ermission" in (state.error or "")
            else "export DYN_KVBM_DISK_CACHE_DIR=<a directory of your own>"
            if "other users could" in (state.error or "")
            else "export DYN_KVBM_DISK_CACHE_DIR=<a writable directory on a local disk>"
        )
        return fail(f"{state.path}: {state.error}", fix)
    mode = stat.S_IMODE(state.path.stat().st_mode)
    if mode & 0o077:
        return warn(
            f"{state.path} is open to other users (mode {mode:o}): G3 holds the KV of users' prompts",
            f"chmod 700 {state.path}",
        )
    return ok(f"{state.path} {'created' if state.created else 'exists'}, writable, mode 700")


def disk_space(ctx: DoctorContext) -> Outcome | None:
    if not ctx.kvbm.has_disk_tier or not ctx.disk_dir.ok:
        return None
    path = ctx.disk_dir.path
    fstype, mnt = filesystem_of(path)
    st = os.statvfs(path)
    where = f"{path} on {fstype} ({mnt})"
    if st.f_blocks == 0:
        return warn(
            f"{where} reports no size: free space unknown, and G3 would live in RAM",
            "export DYN_KVBM_DISK_CACHE_DIR=<a directory on a disk-backed filesystem (ext4, xfs)>",
        )
    free = st.f_bavail * st.f_frsize
    per = ctx.disk_tier_bytes()
    n = ctx.tiered_workers  # a disagg decode worker has no G3 of its own
    if per is None:
        return ok(f"{where}: {gb(free)} free; G3 is sized in blocks of unknown size")
    need = per * n
    reusable = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.is_symlink())
    detail = f"{where}: G3 needs {gb(need)}" + (f" ({gb(per)} × {n} workers)" if n > 1 else "")
    detail += f", {gb(free)} free" + (f" + {gb(reusable)} already in the pool" if reusable else "")
    if free + reusable < need:
        fit = max(0.1, (free + reusable) * 0.9 / n / 1e9)
        return fail(
            detail,
            f"export DYN_KVBM_DISK_CACHE_GB={fit:.1f}   # or DYN_KVBM_DISK_CACHE_DIR on a bigger disk",
        )
    if fstype in MEMORY_FS:
        return warn(
            detail + f"; {fstype} keeps G3 in RAM",
            "export DYN_KVBM_DISK_CACHE_DIR=<a directory on a disk-backed filesystem (ext4, xfs)>",
        )
    return ok(detail)


def _errname(exc: OSError) -> str:
    if exc.errno == errno.EOPNOTSUPP:  # same number as ENOTSUP on Linux; the man page's name
        return "EOPNOTSUPP"
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@dataclass(frozen=True)
class _Probe:
    """One of the runtime's filesystem probes as the doctor reports it: both read alike (works /
    refused, with or without the fallback variable set / failed otherwise), only the words differ."""

    what: str  # the call, as the man page names it
    run: Callable[[Path], OSError | None]
    refused: Callable[[OSError], bool]  # the filesystem does not do it (a fallback can serve)
    refused_as: str  # how the refusal reads after `what`
    variable: str  # the fallback's variable; the doctor says `{variable}=true`
    fallback_on: Callable[[KvbmSettings], bool]
    needless: str  # added to "works" when the fallback variable is set anyway
    fallback: str  # how the fallback in use reads
    failed_as: str  # how any other error reads after `what`
    failed_fix: str


FALLOCATE = _Probe(
    what="fallocate(2)",
    run=diskio.probe_fallocate,
    refused=diskio.fallocate_unsupported,
    refused_as="is unsupported",
    variable=ZEROFILL,
    fallback_on=lambda k: k.disk_zerofill_fallback,
    needless=f" ({ZEROFILL} is set but not needed)",
    fallback=f"{ZEROFILL}=true zero-fills the pool (slower first start)",
    failed_as="failed",
    failed_fix="free space in DYN_KVBM_DISK_CACHE_DIR, or point it at another disk",
)
O_DIRECT = _Probe(
    what="O_DIRECT",
    run=diskio.probe_o_direct,
    refused=lambda exc: exc.errno == errno.EINVAL,
    refused_as="is refused",
    variable=NO_O_DIRECT,
    fallback_on=lambda k: k.disk_disable_o_direct,
    needless=f" ({NO_O_DIRECT}=true: buffered I/O is used anyway)",
    fallback=f"{NO_O_DIRECT}=true (buffered I/O)",
    failed_as="write failed",
    failed_fix="check DYN_KVBM_DISK_CACHE_DIR (space, permissions)",
)


def _probe_outcome(probe: _Probe, ctx: DoctorContext) -> Outcome | None:
    """Run `probe` for real in the G3 directory and say what it means, with the fix."""
    if not ctx.kvbm.has_disk_tier or not ctx.disk_dir.ok:
        return None
    path = ctx.disk_dir.path
    fstype, _ = filesystem_of(path)
    exc = probe.run(path)
    fallback = probe.fallback_on(ctx.kvbm)
    if exc is None:
        note = probe.needless if fallback else ""
        return ok(f"{probe.what} works in {path} ({fstype}){note}")
    if probe.refused(exc):
        detail = f"{probe.what} {probe.refused_as} in {path} ({fstype}: {_errname(exc)})"
        if fallback:
            return ok(f"{detail}; fallback in use: {probe.fallback}")
        return fail(
            detail, f"export {probe.variable}=true   # or put DYN_KVBM_DISK_CACHE_DIR on ext4/xfs"
        )
    return fail(f"{probe.what} {probe.failed_as} in {path}: {exc}", probe.failed_fix)


def disk_fallocate(ctx: DoctorContext) -> Outcome | None:
    return _probe_outcome(FALLOCATE, ctx)


def disk_o_direct(ctx: DoctorContext) -> Outcome | None:
    return _probe_outcome(O_DIRECT, ctx)


def disk_filter(ctx: DoctorContext) -> Outcome | None:
    k = ctx.kvbm
    if not k.has_disk_tier:
        return None
    if not k.has_host_tier:
        return ok("no G2: the SSD filter (which guards G2 → G3) does not apply")
    if k.disable_disk_offload_filter:
        return warn(
            f"SSD filter disabled ({NO_FILTER}): every block G2 evicts is written to disk, "
            "one-off prompts included (SSD wear, write bandwidth)",
            f"unset {NO_FILTER}",
        )
    return ok(
        f"SSD filter on: a block reaches disk once reused ≥ 2 times "
        f"(decay {k.disk_offload_filter_decay_secs:g} s, ≤ {k.disk_offload_filter_max_entries:,} entries)"
    )


CHECKS = [
    Check("disk.dir", "G3 directory", disk_dir),
    Check("disk.space", "G3 free space", disk_space),
    Check("disk.fallocate", "G3 preallocation (fallocate)", disk_fallocate),
    Check("disk.o_direct", "G3 direct I/O (O_DIRECT)", disk_o_direct),
    Check("disk.filter", "SSD offload filter", disk_filter),
]
