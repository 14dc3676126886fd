"""Prefix heat: how many requests have recently reached a prefix, to price a replica of it.

Scored one request at a time, a worker that lacks a prefix another worker holds pays the whole
recompute, so under a stream of requests behind one long prefix every decision piles on the
holder however long its queue grows: no single request is worth a second copy. A copy is a
one-time cost that every later request with the prefix shares, so the scorer amortizes the
recompute of blocks held elsewhere over the requests expected to follow (`score.estimate`). The
past predicts them: a prefix's heat is the exponentially decayed count of earlier requests whose
deepest block held anywhere in the fleet was that prefix's last block (its *boundary*).

Counting at the boundary, not at every block, is what keeps conversations where they are: each
round of a conversation ends deeper than the last, so its boundary is new every time and its heat
stays 0 — moving it costs its full recompute, as it should (its rounds come one at a time, a copy
would serve nobody else). Many users behind one system prompt all stop at the same boundary, and
its heat grows with the traffic (docs/kv-events.md#replicating-a-hot-prefix).

Bounded: the least recently reached keys go first. Not thread-safe: the router's event loop owns it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class PrefixHeat:
    def __init__(
        self,
        half_life_s: float = 60.0,
        max_keys: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        self.half_life_s = half_life_s
        self.max_keys = max_keys
        self.clock = clock
        self._decay = math.log(2) / half_life_s
        self._heat: OrderedDict[int, tuple[float, float]] = OrderedDict()  # key → (count, when)

    def observe(self, key: int) -> float:
        """A request reached `key` as its boundary: returns the heat before it, then counts it."""
        now = self.clock()
        before = self._decayed(self._heat.pop(key, None), now)
        self._heat[key] = (before + 1.0, now)
        if len(self._heat) > self.max_keys:
            self._heat.popitem(last=False)
        return before

    def heat(self, key: int) -> float:
        return self._decayed(self._heat.get(key), self.clock())

    def _decayed(self, entry: tuple[float, float] | None, now: float) -> float:
        if entry is None:
            return 0.0
        count, when = entry
        return count * math.exp(-self._decay * max(0.0, now - when))

    def __len__(self) -> int:
        return len(self._heat)
