"""The leader: the index of what each tier holds, and the policies that decide where blocks go.

Runs beside vLLM's scheduler. It never touches block bytes: it plans `LoadOp`/`StoreOp`/
`OffloadOp` records that the store executes in the worker, and learns from the store's reports
which blocks failed. Policies (docs/kvbm.md):
- write-through G1→G2 for every completed block; G1→G3 directly when there is no G2;
- G2→G3 through the SSD frequency filter when both tiers exist: every sighting of a block (a
  store, a hit) is observed, and a block goes to disk once its frequency reaches 2; with the
  filter disabled every stored block goes to disk;
- LRU eviction within each tier; a prefix lookup stops at the first block no tier holds;
- disk hits are promoted into G2 on their way to the device.

The index is optimistic: a block is visible as soon as its transfer is planned, because the store
executes a step's loads before its stores and orders every access to a slot behind the writes
already pending on it. A G2 slot that is being written to disk stays pinned until the store
reports the write finished, so it is never handed to another block mid-write. A failure report
(checksum mismatch, I/O error, dropped write) removes the block: the next lookup misses and vLLM
recomputes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.counters import Count
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.filter import FrequencyFilter
from dynkv.kvbm.handoff import handoff_slots
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.kvbm.ops import HandoffOp, LoadOp, OffloadOp, StoreOp, StoreReport, Tier
from dynkv.kvbm.reuse import ReuseTracker
from dynkv.kvbm.slots import PoolFull, SlotIndex


class TierSink(Protocol):
    """Receives the leader's index changes (the KV event publisher)."""

    def stored(self, tier: Tier, key: int) -> None: ...

    def removed(self, tier: Tier, key: int) -> None: ...


@dataclass(frozen=True)
class Match:
    tiers: tuple[Tier, ...]

    @property
    def blocks(self) -> int:
        return len(self.tiers)

    @property
    def host_blocks(self) -> int:
        return sum(1 for t in self.tiers if t is Tier.HOST)

    @property
    def disk_blocks(self) -> int:
        return sum(1 for t in self.tiers if t is Tier.DISK)


def tier_sizes(layout: BlockLayout, settings: KvbmSettings) -> tuple[int, int]:
    """(G2 slots, G3 slots): decimal GB ÷ bytes per block, or the override counts."""
    bpb = layout.bytes_per_block
    host, disk = settings.host_blocks(bpb), settings.disk_blocks(bpb)
    if not host and not disk and settings.handoff_dir is None:
        raise KvbmConfigError(
            f"no KVBM tier is configured, or the tiers are smaller than one block ({bpb} bytes)",
            "export DYN_KVBM_CPU_CACHE_GB=4 (host tier) and/or DYN_KVBM_DISK_CACHE_GB=8",
        )
    return host, disk


def _reserve(index: SlotIndex) -> tuple[int, int | None]:
    """(a free or least recently used slot, the key evicted from it); (-1, None) when every slot
    is pinned."""
    try:
        return index.reserve()
    except PoolFull:
        return -1, None


class BlockLeader:
    def __init__(
        self,
        layout: BlockLayout,
        settings: KvbmSettings,
        *,
        metrics: KvbmMetrics | None = None,
        disk_entries: Iterable[tuple[int, int]] = (),
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.metrics = metrics or KvbmMetrics()
        self.workers = workers
        host_slots, disk_slots = tier_sizes(layout, settings)
        self.host = SlotIndex(host_slots) if host_slots else None
        self.disk = SlotIndex(disk_slots) if disk_slots else None
        self.handoff = (
            SlotIndex(handoff_slots(settings.handoff_gb, layout.slot_stride))
            if settings.writes_handoff
            else None
        )
        if self.disk is not None:
            self.disk.restore(disk_entries)
        self.filter = (
            FrequencyFilter(
                settings.disk_offload_filter_decay_secs,
                settings.disk_offload_filter_max_entries,
                clock,
            )
            if self.host is not None
            and self.disk is not None
            and not settings.disable_disk_offload_filter
            else None
        )
        # evictions and reuse after eviction, for `dynkv advise` (dynkv/kvbm/reuse.py)
        self.reuse = ReuseTracker(host_slots) if host_slots else None
        self._step_host_pins: list[int] = []
        self._step_disk_pins: list[int] = []
        self._offload_acks: Counter[int] = Counter()  # host slot -> acks still expected
        self.metrics.bind_capacity(
            (lambda: len(self.host)) if self.host is not None else None,
            host_slots,
            (lambda: len(self.disk)) if self.disk is not None else None,
            disk_slots,
        )

    def watch(self, sink: TierSink) -> None:
        """Tell `sink` of every block G2/G3 gains or loses (KV events, docs/kv-events.md),
        starting with those held now (G3 blocks restored from an earlier run)."""
        for tier, index in ((Tier.HOST, self.host), (Tier.DISK, self.disk)):
            if index is not None:
                index.watch(partial(sink.stored, tier), partial(sink.removed, tier))

    # ---- lookup ----------------------------------------------------------------------------------
    def match(self, keys: Sequence[int]) -> Match:
        """Longest prefix of `keys` that some tier holds. No side effects."""
        tiers: list[Tier] = []
        for key in keys:
            if self.host is not None and key in self.host:
                tiers.append(Tier.HOST)
            elif self.disk is not None and key in self.disk:
                tiers.append(Tier.DISK)
            else:
                break
        return Match(tuple(tiers))

    def record_lookup(self, asked: int, match: Match) -> None:
        """Feed the hit-rate window: `asked` blocks were looked up, `match` is what hit."""
        self.metrics.record_request(asked, match.host_blocks, match.disk_blocks)

    # ---- planning --------------------------------------------------------------------------------
    def plan_load(
        self, keys: Sequence[int], device_blocks: Sequence[int]
    ) -> tuple[list[LoadOp], list[OffloadOp]]:
        """Loads for the leading `keys` that are still held (a block evicted since `match` ends the
        plan: the caller reports the rest as failed). Slots stay pinned until `end_step`."""
        loads: list[LoadOp] = []
        offloads: list[OffloadOp] = []
        for key, block in zip(keys, device_blocks, strict=False):
            if self.host is not None and key in self.host:
                slot = self.host.slot_of(key)
                assert slot is not None
                self.host.touch(key)
                if self.reuse is not None:
                    self.reuse.hit(key)
                self._pin_host(slot)
                loads.append(LoadOp(key, block, slot))
                offloads.extend(self._observe(key, slot))
            elif self.disk is not None and key in self.disk:
                dslot = self.disk.slot_of(key)
                assert dslot is not None
                self.disk.touch(key)
                self._count_reuse(key, Count.REUSE_AFTER_EVICT_DISK)
                self.disk.pin(dslot)
                self._step_disk_pins.append(dslot)
                slot = -1
                if self.host is not None:
                    slot = self._reserve_host()
                    if slot < 0:  # G2 entirely pinned: read through staging instead
                        loads.append(LoadOp(key, block, -1, dslot))
                        continue
                    self.host.publish(slot, key)
                    self._pin_host(slot)
                loads.append(LoadOp(key, block, slot, dslot))
                if self.filter is not None:
                    self.filter.observe(key)
            else:
                break
        return loads, offloads

    def plan_store(
        self, keys: Sequence[int], device_blocks: Sequence[int]
    ) -> tuple[list[StoreOp], list[OffloadOp]]:
        """Write-through of completed device blocks; blocks already held are only touched."""
        stores: list[StoreOp] = []
        offloads: list[OffloadOp] = []
        seen: set[int] = set()
        for key, block in zip(keys, device_blocks, strict=True):
            if key in seen:
                continue
            seen.add(key)
            if self.host is not None:
                slot = self.host.slot_of(key)
                if slot is not None:
                    self.host.touch(key)
                    offloads.extend(self._observe(key, slot))
                    continue
                self._count_reuse(key, Count.REUSE_AFTER_EVICT_RECOMPUTED)
                slot = self._reserve_host()
                if slot < 0:
                    # every G2 slot is busy (pinned by disk writes in flight): a block that has
                    # earned its place on disk goes there directly rather than being dropped
                    direct = self._direct_to_disk(key, block)
                    if direct is None:
                        self.metrics.count(Count.OFFLOAD_DROPPED)
                    else:
                        stores.append(direct)
                    continue
                self.host.publish(slot, key)
                stores.append(StoreOp(key, block, host_slot=slot))
                offloads.extend(self._observe(key, slot))
            elif self.disk is not None:
                if key in self.disk:
                    self.disk.touch(key)
                    continue
                dslot = self._reserve_disk()
                if dslot < 0:
                    self.metrics.count(Count.OFFLOAD_DROPPED)
                    continue
                self.disk.publish(dslot, key)
                stores.append(StoreOp(key, block, disk_slot=dslot))
        return stores, offloads

    def plan_handoff(
        self, keys: Sequence[int], device_blocks: Sequence[int]
    ) -> tuple[list[HandoffOp], list[int]]:
        """Prefill side: the handoff slots of `keys` (blocks already in the pool are reused) and
        the copies still to make. The pool is a ring: the least recently used slot is rewritten."""
        assert self.handoff is not None
        ops: list[HandoffOp] = []
        slots: list[int] = []
        for key, block in zip(keys, device_blocks, strict=True):
            slot = self.handoff.slot_of(key)
            if slot is None:
                slot, _evicted = self.handoff.reserve()
                self.handoff.publish(slot, key)
                ops.append(HandoffOp(key, block, slot))
            else:
                self.handoff.touch(key)
            slots.append(slot)
        return ops, slots

    @staticmethod
    def plan_handoff_load(
        keys: Sequence[int], device_blocks: Sequence[int], slots: Sequence[int], pool: str = ""
    ) -> list[LoadOp]:
        """Decode side: read the prefill's blocks from its handoff pool into the device."""
        return [
            LoadOp(key, block, handoff_slot=slot, handoff_pool=pool)
            for key, block, slot in zip(keys, device_blocks, slots, strict=False)
        ]

    def end_step(self) -> None:
        """The step's plan was handed to the workers: its loads run before anything later."""
        if self.host is not None:
            for slot in self._step_host_pins:
                self.host.unpin(slot)
        if self.disk is not None:
            for slot in self._step_disk_pins:
                self.disk.unpin(slot)
        self._step_host_pins.clear()
        self._step_disk_pins.clear()

    # ---- reports ---------------------------------------------------------------------------------
    def apply_report(self, report: StoreReport) -> None:
        for tier, slot, key in report.failures:
            index = {Tier.HOST: self.host, Tier.DISK: self.disk, Tier.HANDOFF: self.handoff}.get(
                tier
            )
            if index is not None and index.slot_of(key) == slot:
                index.remove(key)
                if tier is Tier.HOST and self.reuse is not None:
                    self.reuse.forget(key)
        for slot in report.offloads_done:
            if self._offload_acks[slot] <= 0:
                continue
            self._offload_acks[slot] -= 1
            if self._offload_acks[slot] == 0:
                del self._offload_acks[slot]
                assert self.host is not None
                self.host.unpin(slot)
        for counter, n in report.counts.items():
            self.metrics.count(counter, n)
        for direction, seconds in report.durations:
            self.metrics.transfer_seconds.labels(direction).observe(seconds)

    # ---- internals -------------------------------------------------------------------------------
    def _observe(self, key: int, host_slot: int) -> list[OffloadOp]:
        """A sighting of a G2 block: maybe it has earned its place on disk."""
        if self.disk is None or key in self.disk:
            return []
        if self.filter is not None and self.filter.observe(key) < 2:
            return []
        dslot = self._reserve_disk()
        if dslot < 0:
            self.metrics.count(Count.OFFLOAD_DROPPED)
            return []
        self.disk.publish(dslot, key)
        assert self.host is not None
        self.host.pin(host_slot)  # until every worker reports the write finished
        self._offload_acks[host_slot] += self.workers
        return [OffloadOp(key, host_slot, dslot)]

    def _direct_to_disk(self, key: int, block: int) -> StoreOp | None:
        if self.disk is None or key in self.disk:
            return None
        if self.filter is not None and self.filter.observe(key) < 2:
            return None
        dslot = self._reserve_disk()
        if dslot < 0:
            return None
        self.disk.publish(dslot, key)
        return StoreOp(key, block, disk_slot=dslot)

    def _pin_host(self, slot: int) -> None:
        assert self.host is not None
        self.host.pin(slot)
        self._step_host_pins.append(slot)

    def _reserve_host(self) -> int:
        assert self.host is not None
        slot, evicted = _reserve(self.host)
        if evicted is not None and self.reuse is not None:
            self.metrics.count(Count.HOST_EVICTED)
            # kept off G3 by the filter: not on disk, and not yet seen often enough to go there
            filtered = (
                self.filter is not None
                and self.disk is not None
                and evicted not in self.disk
                and not self.filter.should_offload(evicted)
            )
            if self.reuse.evicted(evicted, filtered=filtered).unused:
                self.metrics.count(Count.HOST_EVICTED_UNUSED)
        return slot

    def _reserve_disk(self) -> int:
        assert self.disk is not None
        slot, evicted = _reserve(self.disk)
        if evicted is not None:
            self.metrics.count(Count.DISK_EVICTED)
        return slot

    def _count_reuse(self, key: int, served: Count) -> None:
        """`key` is wanted again (a G3 hit, or a G2 miss being stored anew): reuse after eviction
        when G2 evicted it recently; a recomputed one the filter had kept off G3 starved G3."""
        entry = self.reuse.reused(key) if self.reuse is not None else None
        if entry is None:
            return
        self.metrics.count(served)
        if served is Count.REUSE_AFTER_EVICT_RECOMPUTED and entry.filtered:
            self.metrics.count(Count.FILTER_STARVED)

    def stats(self) -> dict[str, int]:
        return {
            "host_blocks_used": len(self.host) if self.host is not None else 0,
            "host_blocks_total": self.host.capacity if self.host is not None else 0,
            "disk_blocks_used": len(self.disk) if self.disk is not None else 0,
            "disk_blocks_total": self.disk.capacity if self.disk is not None else 0,
            "filter_entries": len(self.filter) if self.filter is not None else 0,
            "offloads_in_flight": len(self._offload_acks),
        }
