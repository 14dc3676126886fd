"""The SSD frequency filter: only blocks that are reused earn a place on disk.

Semantics (Dynamo's filter; docs/kvbm.md): a block's frequency starts at 1 when it is first seen and
doubles on each further sighting (a hit, or a store of a block seen before); every decay period
(counted from the filter's creation) all frequencies drop by 1 and zeros are forgotten; a block is
offloaded to disk only when its frequency is ≥ 2. The table is bounded: it holds the
`max_entries` most recently seen blocks, and past that the least recently seen one goes.

Decay is lazy and per entry, so that no call ever walks the table: each entry keeps the period it
was last set in, and its frequency is what it was set to minus the periods since. A period's end
therefore costs nothing (rebuilding a full table of a million entries took ~0.4 s, inside vLLM's
scheduler step, once a period). An entry that decayed to zero reads as never seen; it is dropped
when it reaches the least recently seen end (a few per call) or by the bound, and until then it
counts in `len`. No timer thread: tests drive time through an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

THRESHOLD = 2
_CAP = 1 << 30  # doubling stops here; decay by 1 per period makes anything above moot
SWEEP = 8  # decayed entries dropped per call at most: the work a period's end leaves is spread


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
        # key -> (frequency when last set, the period it was set in); least recently seen first
        self._freq: OrderedDict[int, tuple[int, int]] = OrderedDict()

    def _period(self) -> int:
        return int((self._clock() - self._origin) // self.decay_secs)

    def _sweep(self, period: int) -> None:
        """Drop up to SWEEP decayed entries from the least recently seen end."""
        for _ in range(SWEEP):
            oldest = next(iter(self._freq.items()), None)
            if oldest is None or oldest[1][0] - (period - oldest[1][1]) > 0:
                return
            del self._freq[oldest[0]]

    def _current(self, key: int, period: int) -> int:
        entry = self._freq.get(key)
        return 0 if entry is None else max(0, entry[0] - (period - entry[1]))

    def observe(self, key: int) -> int:
        """Record a sighting of `key`; returns its new frequency."""
        period = self._period()
        freq = self._current(key, period)
        freq = 1 if freq == 0 else min(freq * 2, _CAP)
        self._freq.pop(key, None)
        self._freq[key] = (freq, period)
        self._sweep(period)
        while len(self._freq) > self.max_entries:
            self._freq.popitem(last=False)
        return freq

    def frequency(self, key: int) -> int:
        period = self._period()
        self._sweep(period)
        return self._current(key, period)

    def should_offload(self, key: int) -> bool:
        return self.frequency(key) >= THRESHOLD

    def __len__(self) -> int:
        """Entries held: the live ones and decayed ones not dropped yet."""
        return len(self._freq)
