"""The block manager: leader and store together, for one process.

Inside vLLM the two halves live in different processes (the connector carries `ops` between them
in vLLM's metadata). Benchmarks, tests and any single-process embedding use this facade, which runs
one engine "step" per call with the same code paths and the same ordering (loads before stores,
reports applied after each step):

    m = BlockManager(layout, settings)
    m.match(keys)                          # longest prefix held by any tier; no side effects
    failed = m.load(keys, device, blocks)  # onboard into device blocks; failed ones recompute
    m.save(keys, device, blocks)           # write-through of completed device blocks
    m.flush(); m.close()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.leader import BlockLeader, Match
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.kvbm.ops import Tier
from dynkv.kvbm.store import BlockStore, Device

__all__ = ["BlockManager", "Match", "Tier"]


class BlockManager:
    def __init__(
        self,
        layout: BlockLayout,
        settings: KvbmSettings,
        *,
        metrics: KvbmMetrics | None = None,
        pin_memory: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.store = BlockStore(layout, settings, pin_memory=pin_memory)
        try:
            self.leader = BlockLeader(
                layout,
                settings,
                metrics=metrics,
                disk_entries=[(e.key, e.slot) for e in self.store.disk_entries],
                clock=clock,
            )
        except BaseException:
            self.store.close()
            raise
        self.metrics = self.leader.metrics

    def match(self, keys: Sequence[int]) -> Match:
        return self.leader.match(keys)

    def record_lookup(self, asked: int, match: Match) -> None:
        self.leader.record_lookup(asked, match)

    def load(self, keys: Sequence[int], device: Device, device_blocks: Sequence[int]) -> list[int]:
        """Onboard the blocks of `keys` into `device_blocks`; returns the device blocks that must
        be recomputed (not held, evicted, or failed verification)."""
        loads, offloads = self.leader.plan_load(keys, device_blocks)
        self.leader.end_step()
        failed = self.store.load(loads, device)
        failed += list(device_blocks[len(loads) :])
        self.store.store([], offloads, device)
        self.sync()
        return failed

    def save(self, keys: Sequence[int], device: Device, device_blocks: Sequence[int]) -> int:
        """Write-through of completed device blocks; returns how many were new to the runtime."""
        stores, offloads = self.leader.plan_store(keys, device_blocks)
        self.leader.end_step()
        self.store.store(stores, offloads, device)
        self.sync()
        return len(stores)

    def hand_off(
        self, keys: Sequence[int], device: Device, device_blocks: Sequence[int]
    ) -> list[int]:
        """Prefill side of disaggregated serving: put the blocks in the handoff pool; returns
        their slots (what travels to the decode worker in kv_transfer_params)."""
        ops, slots = self.leader.plan_handoff(keys, device_blocks)
        self.store.write_handoff(ops, device)
        self.sync()
        return slots

    def receive(
        self,
        keys: Sequence[int],
        slots: Sequence[int],
        device: Device,
        device_blocks: Sequence[int],
        pool: str = "",
    ) -> list[int]:
        """Decode side: read handed-off blocks from pool `pool` (the id the prefill worker
        returned with its slots) into the device; returns blocks to recompute."""
        loads = self.leader.plan_handoff_load(keys, device_blocks, slots, pool)
        failed = self.store.load(loads, device)
        self.sync()
        return failed

    def sync(self) -> None:
        """Apply what the store has to report (failures, finished disk writes, counters)."""
        self.leader.apply_report(self.store.take_report())

    def flush(self, timeout: float | None = None) -> None:
        self.store.flush(timeout)
        self.sync()

    def stats(self) -> dict[str, int]:
        return self.leader.stats()

    def close(self) -> None:
        self.flush()
        self.store.close()
        self.metrics.close()
