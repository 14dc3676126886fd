"""What G2 evicts and whether it was wanted again: the evidence `dynkv advise` reads.

A block that G2 evicts before anyone reuses it cost a host copy for nothing; a block asked for
again after G2 evicted it is reuse that a bigger G2 (or a G3 that had taken it) would have
served. Neither shows in hit rates. The tracker keeps:
- the G2 keys hit since they were stored (bounded by G2's own size: a key leaves when evicted);
- a "ghost" list of the last keys G2 evicted (as many as G2 holds, oldest dropped first), each
  marked whether G3 did not hold it when it left G2 while the SSD filter was on. A later store or
  disk hit of a ghost key is reuse after eviction; reuse within one G2's worth of evictions is
  what a G2 of twice the size would have kept.

Pure bookkeeping (no metrics, no locks): the leader calls it under the manager's lock and counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Evicted:
    """One ghost entry: `unused` when G2 never served it; `filtered` when the filter kept it off
    G3 (G3 did not hold it at eviction while the filter was on)."""

    unused: bool
    filtered: bool


class ReuseTracker:
    def __init__(self, ghost_capacity: int) -> None:
        if ghost_capacity <= 0:
            raise ValueError("ghost_capacity must be positive")
        self.ghost_capacity = ghost_capacity
        self._hit: set[int] = set()
        self._ghost: OrderedDict[int, Evicted] = OrderedDict()

    def hit(self, key: int) -> None:
        """G2 served `key`."""
        self._hit.add(key)

    def evicted(self, key: int, *, filtered: bool) -> Evicted:
        """G2 evicted `key`; returns what was recorded for it."""
        entry = Evicted(unused=key not in self._hit, filtered=filtered)
        self._hit.discard(key)
        self._ghost.pop(key, None)
        self._ghost[key] = entry
        while len(self._ghost) > self.ghost_capacity:
            self._ghost.popitem(last=False)
        return entry

    def reused(self, key: int) -> Evicted | None:
        """`key` is wanted again (stored anew, or loaded from G3): its ghost entry, if G2 evicted
        it recently; the entry is consumed (one reuse is counted once)."""
        return self._ghost.pop(key, None)

    def forget(self, key: int) -> None:
        """`key` left G2 other than by eviction (a failed load removed it)."""
        self._hit.discard(key)
