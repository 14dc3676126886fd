"""What the leader asks the block store to do in one engine step, and what the store reports back.

vLLM runs its scheduler and its model worker(s) in different processes (on CPU: EngineCore and a
spawned worker; with tensor parallelism, one worker per GPU). The leader (scheduler side) owns
the index and the policies and decides *where* each block goes; the store (worker side) owns the
bytes — host memory, disk pool, checksums, journal — and moves them. These plain, picklable
records are all that crosses between the two, inside vLLM's own connector metadata.

Slots are numbers in the host pool (G2) or the disk pool (G3); -1 means "not involved".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from dynkv.kvbm.counters import Count


class Tier(StrEnum):
    """Where a block lives outside the device: G2, G3, or the disaggregated handoff pool."""

    HOST = "host"
    DISK = "disk"
    HANDOFF = "handoff"


@dataclass(frozen=True)
class LoadOp:
    """Onboard `key` into device block `device_block`.

    host hit:              host_slot ≥ 0, disk_slot = -1
    disk hit, with G2:     host_slot ≥ 0 (promotion target), disk_slot ≥ 0
    disk hit, no G2:       host_slot = -1, disk_slot ≥ 0 (read through a staging buffer)
    prefill handoff:       handoff_slot ≥ 0 in the shared handoff pool `handoff_pool` (the
                           prefill worker's pool id; "" when the handoff area is the one pool)
    """

    key: int
    device_block: int
    host_slot: int = -1
    disk_slot: int = -1
    handoff_slot: int = -1
    handoff_pool: str = ""

    @property
    def from_disk(self) -> bool:
        return self.disk_slot >= 0

    @property
    def from_handoff(self) -> bool:
        return self.handoff_slot >= 0


@dataclass(frozen=True)
class StoreOp:
    """Offload device block `device_block` (which holds `key`) to G2 (`host_slot`) or, when there
    is no G2, straight to G3 (`disk_slot`)."""

    key: int
    device_block: int
    host_slot: int = -1
    disk_slot: int = -1


@dataclass(frozen=True)
class OffloadOp:
    """Copy the block in G2 slot `host_slot` to G3 slot `disk_slot` (asynchronously)."""

    key: int
    host_slot: int
    disk_slot: int


@dataclass(frozen=True)
class HandoffOp:
    """Prefill side of disaggregated serving: copy device block `device_block` (holding `key`)
    into slot `slot` of the shared handoff pool, for a decode worker to read."""

    key: int
    device_block: int
    slot: int


@dataclass
class StepOps:
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    offloads: list[OffloadOp] = field(default_factory=list)
    handoffs: list[HandoffOp] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads or self.stores or self.offloads or self.handoffs)


@dataclass
class StoreReport:
    """Worker → leader, once per step: what failed, which offloads finished, and counters."""

    failures: list[tuple[Tier, int, int]] = field(default_factory=list)  # (tier, slot, key)
    offloads_done: list[int] = field(default_factory=list)  # host slots free to reuse
    counts: dict[Count, int] = field(default_factory=dict)
    durations: list[tuple[str, float]] = field(default_factory=list)
    # what each load cost, for the onboard policy: (source tier, blocks, seconds read + verified
    # + copied to the device)
    loads: list[tuple[Tier, int, float]] = field(default_factory=list)
    # steps that asked to be acknowledged, done: (step, seconds the connector itself spent in it,
    # loading and saving — not part of the engine's own prefill time)
    steps: list[tuple[int, float]] = field(default_factory=list)

    def count(self, counter: Count, n: int = 1) -> None:
        if not isinstance(counter, Count):  # a plain string would be silently lost later
            raise TypeError(f"not a KVBM counter: {counter!r}")
        if n:
            self.counts[counter] = self.counts.get(counter, 0) + n

    def merge(self, other: StoreReport) -> StoreReport:
        self.failures.extend(other.failures)
        self.offloads_done.extend(other.offloads_done)
        for name, n in other.counts.items():
            self.count(name, n)
        self.durations.extend(other.durations)
        self.loads.extend(other.loads)
        self.steps.extend(other.steps)
        return self

    def __bool__(self) -> bool:
        return bool(
            self.failures
            or self.offloads_done
            or self.counts
            or self.durations
            or self.loads
            or self.steps
        )


def discard_computed(ops: StepOps) -> tuple[StepOps, StoreReport]:
    """The ops of a step whose loads failed, less what that step computed.

    A failed load leaves garbage in a device block that the same step's forward pass then
    attends to, so every block the step computed — its stores and handoffs — holds KV that is
    not the prompt's until vLLM recomputes it (it rewinds the request to the failed block).
    Which request a store belongs to does not cross into the worker, so the whole step's
    stores and handoffs go, reported as failures so the leader forgets their slots; the
    recompute stores them again. Offloads of blocks already in G2 stay, except those of a
    discarded store's slot (the bytes never arrived), whose pins are released."""
    report = StoreReport()
    dropped_host: set[int] = set()
    for op in ops.stores:
        if op.host_slot >= 0:
            dropped_host.add(op.host_slot)
            report.failures.append((Tier.HOST, op.host_slot, op.key))
        else:
            report.failures.append((Tier.DISK, op.disk_slot, op.key))
    offloads = []
    for op in ops.offloads:
        if op.host_slot in dropped_host:
            report.failures.append((Tier.DISK, op.disk_slot, op.key))
            report.offloads_done.append(op.host_slot)
        else:
            offloads.append(op)
    for op in ops.handoffs:
        report.failures.append((Tier.HANDOFF, op.slot, op.key))
    report.count(Count.STORES_DISCARDED, len(ops.stores) + len(ops.handoffs))
    return StepOps(loads=ops.loads, offloads=offloads), report
