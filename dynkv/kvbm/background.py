"""A daemon thread with a stop flag, for the runtime's helpers that live inside vLLM's processes.

The KV event publisher and the G1 bridge each run one loop beside the engine. Both must never keep
the engine from exiting (daemon), stop when asked (`_stop`, checked by their loop) and give a
bounded `close()`: a helper stuck on a dead socket is left behind after `timeout`, not waited on.
"""

from __future__ import annotations

import threading
from typing import Self


class Background:
    """Subclasses set `thread_name` and implement `_run` (the thread's body, which watches `_stop`)."""

    thread_name = "dynkv-kvbm"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Ask the loop to stop and wait for it at most `timeout` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError
