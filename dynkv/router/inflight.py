"""Blocks a worker is about to hold: the prompts the router has just sent it.

The index learns of a block when the worker's KV event arrives, which is after the worker has
computed it. Between the decision and that event, every request with the same prefix would see
the worker as empty: a burst behind one long system prompt then computes the prefix on every
worker at once, and the router under-predicts what the worker reuses (its accuracy drops).

So each decision records the prompt's block keys against the chosen worker, and a later prompt
matches them as device (G1) blocks on that worker — it will find them there once the earlier
prefill is done, and the scorer already charges that wait as the worker's outstanding prefill
tokens. A record lives until its request's first byte arrives (the prompt is computed) plus a
grace period that covers the event's way through the publisher and NATS, or `max_age_s` when no
first byte ever comes. Like the index, a stale record costs a miss, never a wrong answer
(docs/kv-events.md).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynkv.router.index import PrefixMatch


@dataclass
class _Record:
    worker: str
    keys: tuple[int, ...]
    expires: float


class InFlight:
    def __init__(
        self,
        grace_s: float = 2.0,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_s = grace_s
        self.max_age_s = max_age_s
        self.clock = clock
        self._records: dict[int, _Record] = {}
        self._held: dict[str, Counter[int]] = {}  # worker → key → records holding it
        self._ids = itertools.count(1)
        self._next_expiry = float("inf")  # the earliest `expires` of any record

    def add(self, worker: str, keys: Sequence[int]) -> int:
        """The prompt with these block keys was sent to `worker`; returns the record's id."""
        self._expire()
        rid = next(self._ids)
        record = _Record(worker, tuple(keys), self.clock() + self.max_age_s)
        self._records[rid] = record
        self._next_expiry = min(self._next_expiry, record.expires)
        self._held.setdefault(worker, Counter()).update(record.keys)
        return rid

    def prefilled(self, rid: int) -> None:
        """The request's first byte arrived: its blocks are computed, their events on the way."""
        record = self._records.get(rid)
        if record is not None:
            record.expires = min(record.expires, self.clock() + self.grace_s)
            self._next_expiry = min(self._next_expiry, record.expires)

    def drop_worker(self, worker: str) -> None:
        for rid in [r for r, rec in self._records.items() if rec.worker == worker]:
            del self._records[rid]
        self._held.pop(worker, None)

    def run(self, worker: str, keys: Sequence[int]) -> int:
        """How many leading blocks of `keys` are in flight to `worker`."""
        self._expire()
        held = self._held.get(worker)
        if not held:
            return 0
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._records)

    def _expire(self) -> None:
        now = self.clock()
        if now < self._next_expiry:  # the common case: a decision costs no scan
            return
        for rid in [r for r, rec in self._records.items() if rec.expires <= now]:
            record = self._records.pop(rid)
            held = self._held.get(record.worker)
            if held is None:
                continue
            held.subtract(record.keys)
            for k in record.keys:
                if k in held and held[k] <= 0:
                    del held[k]
            if not held:
                del self._held[record.worker]
        self._next_expiry = min((r.expires for r in self._records.values()), default=float("inf"))


def with_in_flight(match: PrefixMatch | None, run: int) -> PrefixMatch | None:
    """The index's match of a worker, with its first `run` blocks known to be headed to G1.

    The index counts a prefix by tier, not by position; the in-flight blocks are the leading
    ones, so they replace host copies first, then disk ones (both are slower than G1)."""
    if run <= 0:
        return match
    match = match or PrefixMatch()
    if run >= match.blocks:
        return PrefixMatch(device=run)
    upgrade = max(0, run - match.device)
    from_host = min(upgrade, match.host)
    from_disk = upgrade - from_host
    return PrefixMatch(match.device + upgrade, match.host - from_host, match.disk - from_disk)
