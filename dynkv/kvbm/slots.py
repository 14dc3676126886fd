"""Fixed pool of slots with an LRU index: the bookkeeping both the host and disk tiers share.

A slot is free, indexed (holds a block under a key; LRU order), or reserved (being filled, not
yet visible to lookups). Pinned indexed slots (being read, or being copied to a lower tier) are
never evicted. Invariants (tested with hypothesis): capacity is never exceeded, no slot is used
twice, a key maps to at most one slot, eviction takes the least recently used unpinned block.
Not thread-safe by itself: the manager holds one lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable


class PoolFull(Exception):
    """Every slot is reserved or pinned: nothing can be evicted right now."""


class SlotIndex:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._lru: OrderedDict[int, int] = OrderedDict()  # key -> slot, oldest first
        self._slot_key: dict[int, int] = {}  # slot -> key, indexed slots only
        # popping from the end hands out ascending slots: fresh batches form contiguous runs
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._reserved: set[int] = set()
        self._pins: Counter[int] = Counter()
        # slots dropped from the index while pinned: freed by their last unpin
        self._orphans: set[int] = set()
        # KV events (docs/kv-events.md): told of every key that becomes visible or leaves
        self._on_stored: Callable[[int], None] | None = None
        self._on_removed: Callable[[int], None] | None = None

    def watch(self, on_stored: Callable[[int], None], on_removed: Callable[[int], None]) -> None:
        """Report the keys held now as stored, then every later change, as it happens."""
        for key in self._lru:
            on_stored(key)
        self._on_stored, self._on_removed = on_stored, on_removed

    # ---- queries (no side effects) -------------------------------------------------------------
    def __contains__(self, key: int) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def slot_of(self, key: int) -> int | None:
        return self._lru.get(key)

    @property
    def used(self) -> int:
        return len(self._lru) + len(self._reserved)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def keys_lru(self) -> list[int]:
        """Indexed keys, least recently used first."""
        return list(self._lru)

    # ---- mutations -----------------------------------------------------------------------------
    def touch(self, key: int) -> None:
        self._lru.move_to_end(key)

    def reserve(self) -> tuple[int, int | None]:
        """A slot to fill: a free one, else the LRU unpinned block's (returned as evicted key)."""
        if self._free:
            slot = self._free.pop()
            self._reserved.add(slot)
            return slot, None
        for key, slot in self._lru.items():
            if not self._pins[slot]:
                del self._lru[key]
                del self._slot_key[slot]
                self._reserved.add(slot)
                if self._on_removed is not None:
                    self._on_removed(key)
                return slot, key
        raise PoolFull

    def publish(self, slot: int, key: int) -> int | None:
        """Make a reserved slot visible under `key` (most recently used). If the key was already
        indexed elsewhere (a racing store), the newer slot wins and the old one is returned."""
        if slot not in self._reserved:
            raise ValueError(f"slot {slot} is not reserved")
        self._reserved.discard(slot)
        old = self._lru.pop(key, None)
        if old is not None:
            del self._slot_key[old]
            if self._pins[old]:
                # still being read: it returns to the free list when unpinned
                self._reserved.add(old)
                self._orphans.add(old)
            else:
                self._free.append(old)
        self._lru[key] = slot
        self._slot_key[slot] = key
        if self._on_stored is not None:
            self._on_stored(key)
        return old

    def release(self, slot: int) -> None:
        """Give back a reserved slot that was not published (a failed or abandoned fill)."""
        if slot not in self._reserved:
            raise ValueError(f"slot {slot} is not reserved")
        self._reserved.discard(slot)
        self._free.append(slot)

    def remove(self, key: int) -> int | None:
        """Drop a block (integrity failure, explicit invalidation). Its slot frees when unpinned."""
        slot = self._lru.pop(key, None)
        if slot is None:
            return None
        del self._slot_key[slot]
        if self._on_removed is not None:
            self._on_removed(key)
        if self._pins[slot]:
            self._reserved.add(slot)
            self._orphans.add(slot)
        else:
            self._free.append(slot)
        return slot

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise ValueError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            del self._pins[slot]
            if slot in self._orphans:
                self._orphans.discard(slot)
                self._reserved.discard(slot)
                self._free.append(slot)

    def restore(self, entries: Iterable[tuple[int, int]]) -> None:
        """Rebuild the index of an empty pool from persisted (key, slot) pairs, oldest first."""
        if self._lru or self._reserved:
            raise ValueError("restore needs an empty pool")
        for key, slot in entries:
            if not 0 <= slot < self.capacity or slot in self._slot_key or key in self._lru:
                continue
            self._lru[key] = slot
            self._slot_key[slot] = key
        self._free = [s for s in range(self.capacity - 1, -1, -1) if s not in self._slot_key]
