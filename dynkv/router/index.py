"""The router's index: which worker holds which block, in which tier, for the whole fleet.

One dict maps a block key to an int whose bits say where it is held: bit `3 * slot + tier_rank`,
where `slot` is the worker's small number, so one lookup per prompt block answers for every worker
at once and a prefix walk is a handful of integer operations per block (docs/kv-events.md). Slot-
major bits keep the values small (below 256, Python's shared small ints, for up to two workers;
one machine word for up to ten). A worker holding a block in G2 and G3 has both bits: losing one
copy keeps the other.

Besides where blocks are, it counts what the fleet holds twice: a block a worker's events store
while it held it in no tier is one it *acquired* (computed, or received from a prefill worker in
disagg); acquired while another worker held it, a *duplicate* (`acquired`, `duplicated`; in an agg
fleet, a prefix computed again though the fleet had it: `dynkv advise`'s `router_spreads_prefixes`,
docs/advise.md). Any tier counts, not G1 alone: with write-through the G2 copy of a computed block
is announced before its G1 one, and a block loaded from the worker's own G2/G3 is no new copy.
Only events count, not snapshots: a snapshot restates blocks held since before the router started.

Bounded by block count: past `max_blocks`, the least recently stored keys are dropped in one
sweep of `max_blocks // 32` (a stale or missing entry costs a cache miss, never a wrong answer:
the worker still computes whatever it does not hold). Not thread-safe: the router's event loop
owns it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from dynkv.kvbm.events import TIERS, Cleared, KvTier, Removed, Stored

N_TIERS = len(TIERS)
_ALL_TIERS = (1 << N_TIERS) - 1
# a worker's three tier bits → the rank of its best (lowest) tier
_BEST = [0] + [(g & -g).bit_length() - 1 for g in range(1, 1 << N_TIERS)]


def _bit(slot: int, tier: KvTier) -> int:
    return 1 << (N_TIERS * slot + tier.rank)


@dataclass(frozen=True)
class PrefixMatch:
    """A worker's leading run of a prompt's blocks, counted by the best tier of each block."""

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def blocks(self) -> int:
        return self.device + self.host + self.disk


class KvIndex:
    def __init__(self, max_blocks: int = 2_000_000) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._map: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []  # slots of removed workers, reused lowest first
        self.evicted_blocks = 0
        self.acquired: Counter[str] = Counter()  # blocks each worker came to hold, by its events
        self.duplicated: Counter[str] = Counter()  # …that another worker held already

    # ---- workers ---------------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return list(self._slot_of)

    def add_worker(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        if slot is None:
            if self._free:
                self._free.sort(reverse=True)
                slot = self._free.pop()
            else:
                slot = len(self._slot_of)
            self._slot_of[worker] = slot
        return slot

    def remove_worker(self, worker: str) -> int:
        """Forget a worker and every block it held; returns how many entries it had."""
        slot = self._slot_of.pop(worker, None)
        if slot is None:
            return 0
        dropped = self._clear_bits(self._worker_mask(slot))
        self._free.append(slot)
        return dropped

    def clear_worker(self, worker: str, tier: KvTier | None = None) -> int:
        """Drop a worker's blocks (of one tier, or all) but keep it known."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return 0
        mask = self._worker_mask(slot) if tier is None else _bit(slot, tier)
        return self._clear_bits(mask)

    @staticmethod
    def _worker_mask(slot: int) -> int:
        return _ALL_TIERS << (N_TIERS * slot)

    def _clear_bits(self, mask: int) -> int:
        keep = ~mask
        hit = [k for k, v in self._map.items() if v & mask]
        for k in hit:
            v = self._map[k] & keep
            if v:
                self._map[k] = v
            else:
                del self._map[k]
        return len(hit)

    # ---- events ----------------------------------------------------------------------------------
    def stored(self, worker: str, tier: KvTier, keys: Iterable[int]) -> None:
        bit = _bit(self.add_worker(worker), tier)
        m = self._map
        for k in keys:
            v = m.pop(k, 0)  # re-inserted last: the most recently stored
            m[k] = v | bit
        if len(m) > self.max_blocks:
            self._evict(len(m) - self.max_blocks + max(1, self.max_blocks // 32))

    def removed(self, worker: str, tier: KvTier, keys: Iterable[int]) -> None:
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        keep = ~_bit(slot, tier)
        m = self._map
        for k in keys:
            v = m.get(k)
            if v is None:
                continue
            v &= keep
            if v:
                m[k] = v
            else:
                del m[k]

    def apply(self, worker: str, event: Stored | Removed | Cleared) -> None:
        if isinstance(event, Stored):
            self._count_acquired(worker, event.keys)
            self.stored(worker, event.tier, event.keys)
        elif isinstance(event, Removed):
            self.removed(worker, event.tier, event.keys)
        else:
            self.clear_worker(worker, event.tier)

    def _count_acquired(self, worker: str, keys: Sequence[int]) -> None:
        """Count the keys `worker` holds in no tier yet, and those of them another worker holds."""
        own = self._worker_mask(self.add_worker(worker))
        get = self._map.get
        new = again = 0
        for k in keys:
            v = get(k, 0)
            if not v & own:
                new += 1
                if v:
                    again += 1
        if new:
            self.acquired[worker] += new
        if again:
            self.duplicated[worker] += again

    def _evict(self, n: int) -> None:
        oldest = list(islice(self._map, n))
        for k in oldest:
            del self._map[k]
        self.evicted_blocks += len(oldest)

    # ---- lookup ----------------------------------------------------------------------------------
    def match(self, keys: Sequence[int]) -> dict[str, PrefixMatch]:
        """For each known worker: how many leading blocks of `keys` it holds, by best tier."""
        # `alive` has bit 3*slot for each worker whose prefix is still unbroken; `lows` selects
        # those bits in a value, and `* 7` widens a 3*slot bit to the worker's three tier bits
        lows = 0
        for slot in self._slot_of.values():
            lows |= 1 << (N_TIERS * slot)
        alive = lows
        get = self._map.get
        runs: list[list[int]] = []  # [bits, count] of consecutive blocks with equal bits
        last = -1
        for k in keys:
            v = get(k, 0)
            alive &= v | v >> 1 | v >> 2
            if not alive:
                break
            v &= alive * _ALL_TIERS
            if v == last:
                runs[-1][1] += 1
            else:
                runs.append([v, 1])
                last = v
        counts = {slot: [0, 0, 0] for slot in self._slot_of.values()}
        for v, n in runs:
            for slot, c in counts.items():
                group = v >> (N_TIERS * slot) & _ALL_TIERS
                if group:
                    c[_BEST[group]] += n
        return {w: PrefixMatch(*counts[slot]) for w, slot in self._slot_of.items()}

    def tiers_of(self, key: int) -> dict[str, KvTier]:
        """Best tier of `key` per worker holding it (tests and debugging)."""
        v = self._map.get(key, 0)
        out: dict[str, KvTier] = {}
        for w, slot in self._slot_of.items():
            group = v >> (N_TIERS * slot) & _ALL_TIERS
            if group:
                out[w] = TIERS[_BEST[group]]
        return out

    # ---- size ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._map)

    def memory_bytes(self) -> int:
        """An estimate of the index's memory: the dict plus its key and value objects."""
        n = len(self._map)
        if not n:
            return sys.getsizeof(self._map)
        sample = list(islice(self._map.items(), 64))
        per = sum(sys.getsizeof(k) + (sys.getsizeof(v) if v > 256 else 0) for k, v in sample)
        return sys.getsizeof(self._map) + per * n // len(sample)
