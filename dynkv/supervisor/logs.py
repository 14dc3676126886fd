"""Service logs: the last lines of a file, and following several at once.

Every process writes its stdout and stderr to its own file under `<deployment>/logs/`, so the
foreground `up`, `dynkv logs` and `dynkv logs -f` all read the same files, whether or not the
`up` that started the services is still running. Containers' logs come from the docker SDK
through the same small `poll()` interface.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol


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
