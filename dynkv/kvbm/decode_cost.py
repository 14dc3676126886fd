"""What a running request costs a new one on this engine: seconds per running request per step.

A prompt sent to a worker that is decoding waits for the step in progress and is then computed in
a step that also carries every running request's next token, so the router prices a worker's
decode load as its running requests × this cost (docs/kv-events.md#scoring). It is measured
here, where the steps happen, instead of the frontend guessing one constant for every model and
machine: each time the scheduler plans a step that continues the decode-only step before it, the
time between the two plans is that step's period (plan, execute, update; vLLM steps back to back
while it has work), divided by the requests it ran. A step after an idle gap does not continue the
one before it, so idle time is never a sample. Pure: the clock reading comes from the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

ALPHA = 0.2  # weight of a new sample: steps are many, one slow one (a GC pause) should not swing it


class DecodeCost:
    """An EWMA of decode-only step periods per request; read from the events publisher's thread."""

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self._value: float | None = None
        self.samples = 0
        self._prev: tuple[float, frozenset[str]] | None = None  # last decode-only plan: when, who
        self._lock = threading.Lock()

    def planned(self, now: float, scheduled: Collection[str], decode_only: bool) -> None:
        """The scheduler planned a step of `scheduled` requests at `now`; `decode_only`: each of
        them computes one more token of its output (none is still in its prompt)."""
        prev = self._prev
        if prev is not None and scheduled:
            t0, running = prev
            period = now - t0
            if period > 0 and not running.isdisjoint(scheduled):  # back to back: no idle gap
                self._add(period / len(running))
        self._prev = (now, frozenset(scheduled)) if decode_only and scheduled else None

    def _add(self, sample: float) -> None:
        with self._lock:
            v = self._value
            self._value = sample if v is None else v + self.alpha * (sample - v)
            self.samples += 1

    @property
    def seconds_per_request(self) -> float | None:
        """None until a decode-only step was followed by another step of its requests."""
        with self._lock:
            return self._value
