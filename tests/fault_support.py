"""Load and bookkeeping for the fault tests: streaming clients that record exactly what each
request saw, and a process-tree snapshot to prove that nothing is left behind.

A `Load` runs N client threads, each sending streamed completions back to back until stopped.
Every request becomes an `Outcome`: its HTTP status (None when no response came), whether the
stream ended with `[DONE]`, the `code` of an SSE error event if the stream carried one, the
exception that ended it if any, and how long it took. Tests assert on the set of outcomes
("what clients see") and on the longest duration ("no hang beyond a bound").
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil


@dataclass(frozen=True)
class Outcome:
    started: float  # monotonic
    seconds: float
    status: int | None
    done: bool = False  # the stream ended with data: [DONE]
    error_code: str | None = None  # code of a `data: {"error": …}` event, or of an error body
    exception: str | None = None  # what ended the request on the client side

    @property
    def kind(self) -> str:
        """One word per way a request can end, for assertions and messages."""
        if self.exception:
            return f"exception:{self.exception}"
        if self.status == 200:
            return "ok" if self.done and not self.error_code else f"broken:{self.error_code}"
        return f"http{self.status}:{self.error_code}"


def stream_once(client: httpx.Client, url: str, body: dict, headers: dict | None = None) -> Outcome:
    t0 = time.monotonic()
    status, done, code = None, False, None
    try:
        with client.stream("POST", url, json=body, headers=headers) as resp:
            status = resp.status_code
            if status != 200:
                resp.read()
                try:
                    code = resp.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
            else:
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and '"error"' in line:
                        event = json.loads(line[6:])
                        if isinstance(event, dict) and "error" in event:
                            code = event["error"].get("code")
    except httpx.HTTPError as exc:
        return Outcome(t0, time.monotonic() - t0, status, done, code, type(exc).__name__)
    return Outcome(t0, time.monotonic() - t0, status, done, code)


class Load:
    """`clients` threads streaming `body` to `url` until `stop()`; outcomes in `outcomes`."""

    def __init__(
        self,
        url: str,
        body: dict,
        *,
        clients: int = 4,
        headers: dict | None = None,
        timeout: float = 30.0,
        pause: float = 0.02,
        stagger: float = 0.15,
    ) -> None:
        self.url, self.body, self.headers = url, body, headers
        self.timeout, self.pause, self.stagger = timeout, pause, stagger
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _run(self, index: int) -> None:
        # staggered starts: clients in lockstep would all sit between two requests at once
        if self._stop.wait(index * self.stagger):
            return
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                outcome = stream_once(client, self.url, self.body, self.headers)
                with self._lock:
                    self.outcomes.append(outcome)
                time.sleep(self.pause)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting"

    def since(self, t0: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t0]

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.outcomes) >= n:
                    return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} requests finished in {timeout} s")

    def kinds(self, outcomes: list[Outcome] | None = None) -> Counter[str]:
        with self._lock:
            chosen = list(self.outcomes) if outcomes is None else outcomes
        return Counter(o.kind for o in chosen)


def descendants(pid: int) -> set[int]:
    """Live descendants of `pid` (all generations)."""
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def still_running(pids: set[int]) -> list[str]:
    """The pids of `pids` that still run (zombies excluded), with their command lines."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            continue
    return alive
