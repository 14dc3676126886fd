"""The SSD frequency filter: only blocks that are reused earn a place on disk.

Semantics (Dynamo's filter; docs/kvbm.md): a block's frequency starts at 1 when it is first seen and
doubles on each further sighting (a hit, or a store of a block seen before); every decay period
(counted from the filter's creation) all frequencies drop by 1 and zeros are forgotten; a block is
offloaded to disk only when its frequency is ≥ 2. The table is bounded: past `max_entries` the
least recently seen entry goes.

Decay is applied lazily on access, by whole periods elapsed, so there is no timer thread and tests
drive time through an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

THRESHOLD = 2
_CAP = 1 << 30  # doubling stops here; decay by 1 per period makes anything above moot


class FrequencyFilter:
    def __init__(
        self,
        decay_secs: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if decay_secs <= 0 or max_entries <= 0:
            raise ValueError("decay_secs and max_entries must be positive")
        self.decay_secs = decay_secs
        self.max_entries = max_entries
        self._clock = clock
        # Periods start when the filter does, not at multiples of the monotonic clock (host
        # uptime): otherwise a period could end a moment after the engine starts, and a block
        # seen once before that moment and again after it would look seen once.
        self._origin = clock()
        self._freq: OrderedDict[int, int] = OrderedDict()
        self._period = self._current_period()

    def _current_period(self) -> int:
        return int((self._clock() - self._origin) // self.decay_secs)

    def _decay(self) -> None:
        period = self._current_period()
        elapsed = period - self._period
        if elapsed <= 0:
            return
        self._period = period
        survivors = OrderedDict()
        for key, freq in self._freq.items():
            if freq - elapsed > 0:
                survivors[key] = freq - elapsed
        self._freq = survivors

    def observe(self, key: int) -> int:
        """Record a sighting of `key`; returns its new frequency."""
        self._decay()
        freq = self._freq.pop(key, None)
        freq = 1 if freq is None else min(freq * 2, _CAP)
        self._freq[key] = freq
        while len(self._freq) > self.max_entries:
            self._freq.popitem(last=False)
        return freq

    def frequency(self, key: int) -> int:
        self._decay()
        return self._freq.get(key, 0)

    def should_offload(self, key: int) -> bool:
        return self.frequency(key) >= THRESHOLD

    def __len__(self) -> int:
        return len(self._freq)
