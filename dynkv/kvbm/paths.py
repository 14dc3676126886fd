"""Private directories and files at predictable paths, created or reused only when they are ours.

The handoff pool (`/dev/shm/dynkv-<name>`), the G3 pool dir and the state dir have names anyone
on the host can guess, and /dev/shm (like /tmp) is writable by everyone. Another user who creates
one of them first, or plants a symlink where a pool file goes, must not get our KV blocks, feed
us theirs, or make us overwrite a file of their choosing. The rule (docs/security.md, "Shared
paths"):

- a directory is created with `os.mkdir(path, 0o700)`; one that already exists is reused only when
  it is a real directory (not a symlink), owned by us and not writable by group or other; any
  group/other read or search bit is then removed (nothing could have been planted in it). Its
  parent must be owned by us or root and not writable by others unless sticky (/tmp, /dev/shm),
  else another user could swap the directory after the check;
- a file in such a directory is opened with O_NOFOLLOW: created with O_CREAT|O_EXCL (0600), or,
  when it exists, reused only when it is a regular file owned by us and not writable by group or
  other (read bits are then removed too). Its directory being ours and closed to others, nobody
  else can swap it between the check and the open.

Anything else is refused with `UnsafePath` (a KvbmConfigError: cause names the path and its owner,
fix says what to do). This module is the one implementation; the supervisor imports it too
(dynkv/kvbm imports nothing else from dynkv, so it cannot live outside).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from dynkv.kvbm.errors import KvbmConfigError

GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO
GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafePath(KvbmConfigError):
    """A shared path exists but is not ours to use (another owner, a symlink, open to others)."""

    def __init__(self, cause: str, fix: str, path: Path) -> None:
        super().__init__(cause, fix)
        self.path = path


def owner_name(uid: int) -> str:
    with contextlib.suppress(KeyError):
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    return f"uid {uid}"


def _problem(info: os.stat_result, want_dir: bool) -> str | None:
    """Why an existing path (lstat/fstat of it) may not be reused, or None when it may."""
    kind_ok = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not kind_ok:
        return "is not a directory" if want_dir else "is not a regular file"
    if info.st_uid != os.getuid():
        return f"is owned by {owner_name(info.st_uid)}, not by {owner_name(os.getuid())}"
    if info.st_mode & GROUP_OTHER_WRITE:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _refuse(path: Path, why: str, fix: str) -> UnsafePath:
    return UnsafePath(f"refusing to use {path}: it {why}", fix, path)


def _ours(info: os.stat_result, path: Path, want_dir: bool, fix: str) -> os.stat_result:
    """`info` when `_problem` finds nothing wrong with it; UnsafePath otherwise."""
    why = _problem(info, want_dir)
    if why is not None:
        raise _refuse(path, why, fix)
    return info


def holder_problem(directory: str | os.PathLike) -> str | None:
    """Why another user could rename or replace what `directory` holds, or None: it must be owned
    by us or root, and not writable by group or other unless sticky (like /tmp and /dev/shm).
    A symlinked `directory` is the user's own set-up: it is followed."""
    info = os.stat(directory)
    if info.st_uid not in (os.getuid(), 0):
        return f"is owned by {owner_name(info.st_uid)}"
    if info.st_mode & GROUP_OTHER_WRITE and not info.st_mode & stat.S_ISVTX:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}, not sticky)"
    return None


def _check_parent(path: Path, fix: str) -> None:
    """UnsafePath when `path`'s parent would let another user swap `path` after our check."""
    try:
        why = holder_problem(path.parent)
    except FileNotFoundError:
        return  # not `create`: the missing path itself is reported by the caller
    if why is not None:
        raise _refuse(path, f"is inside {path.parent}, which {why}", fix)


def private_dir(
    path: str | os.PathLike, fix: str, *, create: bool = True, tighten: bool = True
) -> None:
    """Create `path` (0700; missing parents are created as usual) when `create`, and check it
    (see the module docstring). `tighten=False` leaves an existing directory's read bits alone
    (a parent the user chose, holding only private subdirectories). UnsafePath when it is not
    ours; OSError (FileNotFoundError when not `create`) when it cannot be made or opened."""
    path = Path(path)
    created = False
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_parent(path, fix)
    if create:
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(
                path, _problem(os.lstat(path), True) or "is not a directory", fix
            ) from None
        raise
    try:
        info = _ours(os.fstat(fd), path, True, fix)
        if created or (tighten and info.st_mode & GROUP_OTHER):
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def open_private_file(
    path: str | os.PathLike, flags: int, fix: str, *, create: bool = True
) -> tuple[int, bool]:
    """Open `path` with O_NOFOLLOW: a new file with O_CREAT|O_EXCL (0600) when `create`, else (or
    when it exists) only a regular file of ours not writable by others. Returns (fd, created).
    The directory must have been checked with `private_dir` first."""
    path = Path(path)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            pass
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "is a symbolic link", fix) from None
        raise
    try:
        info = _ours(os.fstat(fd), path, False, fix)
        if info.st_mode & GROUP_OTHER:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def check_existing_file(path: str | os.PathLike, fix: str) -> None:
    """UnsafePath when `path` exists but is not a regular file of ours closed to writers (a file
    about to be replaced by rename, which would otherwise hide a planted one)."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    _ours(info, path, False, fix)
