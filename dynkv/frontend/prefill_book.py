"""The kv policy's view of each worker's prefill queue: what this frontend sent and how far it got.

A worker's prompts sent and not prefilled yet (no first byte) are queued work a new prompt waits
behind. Counting them whole until their first byte overprices a worker whose oldest prompt has
been computing for a while: a conversation's next round would leave the worker holding its
prefix to recompute it elsewhere, although the wait left is short. So the book keeps each
worker's prompts in the order sent, and for the oldest one how long it has been computing: since
it was sent, or since the prompt before it on that worker got its first byte, whichever is later
(a worker computes its queue about first come, first served). The scorer turns that into seconds
left at the worker's measured prefill speed (dynkv/router/score.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Queued:
    """One prompt's prefill on one worker; `PrefillBook.done` ends it."""

    worker: str
    tokens: int
    sent: float
    id: int


@dataclass(frozen=True)
class QueueLoad:
    tokens: int = 0  # all prompt tokens queued on the worker
    head_tokens: int = 0  # the oldest prompt's
    head_elapsed_s: float = 0.0  # how long the oldest has been computing


@dataclass
class PrefillBook:
    """Prompt tokens sent to each worker and not yet prefilled, oldest first."""

    clock: Callable[[], float] = time.monotonic
    _queues: dict[str, dict[int, Queued]] = field(default_factory=dict)
    _last_done: dict[str, float] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def add(self, worker: str, tokens: int) -> Queued:
        entry = Queued(worker, max(0, tokens), self.clock(), next(self._ids))
        self._queues.setdefault(worker, {})[entry.id] = entry
        return entry

    def done(self, entry: Queued) -> None:
        """The prompt's first byte arrived (or it failed): its prefill is over. Idempotent."""
        queue = self._queues.get(entry.worker)
        if queue is None or queue.pop(entry.id, None) is None:
            return
        self._last_done[entry.worker] = self.clock()
        if not queue:
            del self._queues[entry.worker]

    def drop(self, worker: str) -> None:
        """The worker left: forget its queue."""
        self._queues.pop(worker, None)
        self._last_done.pop(worker, None)

    def tokens(self, worker: str) -> int:
        return sum(e.tokens for e in self._queues.get(worker, {}).values())

    def load(self, worker: str) -> QueueLoad:
        queue = self._queues.get(worker)
        if not queue:
            return QueueLoad()
        head = next(iter(queue.values()))  # dicts keep insertion order: the oldest first
        since = max(head.sent, self._last_done.get(worker, head.sent))
        elapsed = max(0.0, self.clock() - since)
        return QueueLoad(sum(e.tokens for e in queue.values()), head.tokens, elapsed)

    def workers(self) -> list[str]:
        """The workers with prompts queued."""
        return list(self._queues)
