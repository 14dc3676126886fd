"""Service logs: the last lines of a file, and following several at once.

Every process writes its stdout and stderr to its own file under `<deployment>/logs/`, so the
foreground `up`, `dynkv logs` and `dynkv logs -f` all read the same files, whether or not the
`up` that started the services is still running. Containers' logs come from the docker SDK
through the same small `poll()` interface.

The files are size-capped: a service writes into a pipe, and a small writer process (this file
run as a script: `python logs.py PATH MAX_BYTES KEEP [append]`, standard library only, so it starts in
milliseconds) appends to PATH and, past MAX_BYTES, renames PATH → PATH.1 → … → PATH.KEEP (the
oldest is dropped), cutting at a line end. It ignores SIGTERM/SIGINT/SIGHUP and ends when every
writer of the pipe has gone, so it still records a service's last words while it shuts down.
Readers follow the rotation (a new inode restarts a follower at the top of the new file).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

LOG_MAX_BYTES = 64 << 20  # per file
LOG_KEEP = 3  # rotated files kept beside the current one


class RotatingLog:
    """Appends to `path` (0600, truncated at open: one run's log); past `max_bytes` it rotates.
    With `append` (a service restarted within the run) the earlier lines stay: the crash that
    caused the restart is what the user will look for."""

    def __init__(
        self,
        path: Path | str,
        max_bytes: int = LOG_MAX_BYTES,
        keep: int = LOG_KEEP,
        *,
        append: bool = False,
    ):
        self.path, self.max_bytes, self.keep = Path(path), max(1, max_bytes), max(1, keep)
        if not append:
            for old in self.rotated():  # a previous run's: this run starts clean
                old.unlink(missing_ok=True)
        self.fd = self._open(truncate=not append)
        self.size = os.fstat(self.fd).st_size

    def rotated(self) -> list[Path]:
        return [Path(f"{self.path}.{i}") for i in range(1, self.keep + 1)]

    def _open(self, *, truncate: bool = True) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        fd = os.open(self.path, flags, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if len(data) <= room:
                self._put(data)
                return
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1  # after the last whole line that fits
            if cut == 0 and self.size > 0:
                self.rotate()  # the line starts the next file
                continue
            cut = cut or room  # a line longer than a whole file: split it
            self._put(data[:cut])
            data = data[cut:]
            self.rotate()

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)

    def rotate(self) -> None:
        os.close(self.fd)
        names = [self.path, *self.rotated()]
        for newer, older in reversed(list(zip(names, names[1:], strict=False))):
            if newer.exists():
                os.replace(newer, older)
        self.fd = self._open()
        self.size = 0

    def close(self) -> None:
        os.close(self.fd)


def pump(source_fd: int, log: RotatingLog) -> None:
    """Copy `source_fd` into `log` until every writer has closed it."""
    while True:
        try:
            chunk = os.read(source_fd, 1 << 16)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if not chunk:
            break
        log.write(chunk)
    log.close()


WRITER_SCRIPT = str(Path(__file__).resolve())


def writer_argv(
    python: str, path: Path | str, max_bytes: int, keep: int, *, append: bool = False
) -> list[str]:
    """The command that runs the writer of one service's log, reading its stdin."""
    argv = [python, "-I", "-S", WRITER_SCRIPT, str(path), str(max_bytes), str(keep)]
    return argv + (["append"] if append else [])


class LogSource(Protocol):
    def poll(self) -> list[str]: ...


def tail_lines(path: Path | str, n: int | None, *, end: int | None = None) -> list[str]:
    """The last `n` lines (all with None) before byte `end` (default: the end of the file), read
    backwards so a large log costs little."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell() if end is None else min(end, f.tell())
            if n is None:
                f.seek(0)
                data = f.read(size)
            else:
                block, data = 8192, b""
                while size > 0 and data.count(b"\n") <= n:
                    step = min(block, size)
                    size -= step
                    f.seek(size)
                    data = f.read(step) + data
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines if n is None else lines[-n:] if n > 0 else []


def last_line(path: Path | str) -> str:
    """The last non-empty line (what a service is doing now), for the progress display."""
    for line in reversed(tail_lines(path, 5)):
        if line.strip():
            return line.strip()
    return ""


class FileFollower:
    """New complete lines of a growing file; survives truncation and the file appearing late."""

    def __init__(self, path: Path | str, *, from_end: bool = True) -> None:
        self.path = Path(path)
        self.pos = 0
        self.inode: int | None = None
        self.buf = b""
        if from_end:
            try:
                st = self.path.stat()
                self.pos, self.inode = st.st_size, st.st_ino
            except FileNotFoundError:
                pass

    def poll(self) -> list[str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.pos:  # replaced or truncated: restart
            self.inode, self.pos, self.buf = st.st_ino, 0, b""
        if st.st_size == self.pos:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


class IteratorFollower:
    """Lines from a blocking iterator (a docker log stream), pumped by a daemon thread."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(lines,), daemon=True)
        self._thread.start()

    def _pump(self, lines: Iterator[str]) -> None:
        for line in lines:
            self._queue.put(line)

    def poll(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out


def follow(
    sources: Mapping[str, LogSource],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    interval: float = 0.2,
) -> Iterator[tuple[str, str]]:
    """(service, line) from every source as lines arrive, until `should_stop()` says so."""
    while not should_stop():
        idle = True
        for name, source in sources.items():
            for line in source.poll():
                idle = False
                yield name, line
        if idle:
            time.sleep(interval)


if __name__ == "__main__":  # the log writer of one service (see the module docstring)
    for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(_sig, signal.SIG_IGN)  # first: the log file appearing means "ignored"
    _append = sys.argv[4:] == ["append"]
    pump(
        sys.stdin.fileno(),
        RotatingLog(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), append=_append),
    )
