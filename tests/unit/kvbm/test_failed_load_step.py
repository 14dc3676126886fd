"""A step whose load fails computes on top of a block that never arrived: none of that step's KV
may be kept, and what vLLM then recomputes is stored as usual.

The connector's two halves are stepped by hand in vLLM 0.32's hook order (lookup, allocation,
the step's metadata, the worker's load and save, the worker's report), with a real store and real
G1 tensors; the failure is a G2 block corrupted in place, which fails its checksum.
"""

from __future__ import annotations

import pytest
from kvbm_helpers import G1, LAYOUT, Blocks, Request, settings

from dynkv.kvbm.counters import Count
from dynkv.kvbm.keys import extra_keys
from dynkv.kvbm.ops import (
    HandoffOp,
    LoadOp,
    OffloadOp,
    StepOps,
    StoreOp,
    Tier,
    discard_computed,
)
from dynkv.kvbm.vllm_scheduler import SchedulerSide
from dynkv.kvbm.vllm_worker import WorkerSide

BS = LAYOUT.block_size


class Connector:
    """The scheduler half and the worker half of one engine: G2 only, every load onboarded and
    every G2 block verified."""

    def __init__(self) -> None:
        s = settings(
            cpu_cache_override_num_blocks=32, onboard_policy="always", host_verify="always"
        )
        self.g1 = G1()
        self.worker = WorkerSide(LAYOUT, s, num_blocks=self.g1.dev.num_blocks)
        self.worker.register_kv_caches(self.g1.kv)
        self.sched = SchedulerSide(LAYOUT, s, serve_metrics=False)

    def step(self, req: Request, blocks: list[int], *, lookup: bool) -> tuple[list, set[int]]:
        """One step that computes the rest of the prompt; returns its stores and load errors."""
        if lookup:
            external, _ = self.sched.get_num_new_matched_tokens(req, req.num_computed_tokens)
            self.sched.update_state_after_alloc(req, Blocks(blocks), external)
            req.num_computed_tokens += external
        plan = self.sched.build_step(
            {req.request_id: req.num_tokens - req.num_computed_tokens}, lambda _r: blocks
        )
        self.worker.start_load(plan.ops, plan.unloadable)
        self.worker.save(plan.ops)
        errors = self.worker.take_load_errors()
        self.sched.apply_report(self.worker.take_report())
        return plan.ops.stores, errors

    def held(self, keys) -> list[bool]:
        host = self.sched.leader.host
        return [host.slot_of(k) is not None for k in keys]

    def close(self) -> None:
        self.sched.close()
        self.worker.close()


@pytest.fixture
def conn():
    c = Connector()
    yield c
    c.close()


def test_a_failed_load_keeps_none_of_its_step_and_the_recompute_is_stored(conn):
    first = Request("a", list(range(2 * BS + 1)))
    stores, errors = conn.step(first, [0, 1, 2], lookup=True)
    assert len(stores) == 2 and not errors
    conn.sched.request_finished("a")
    # the same two blocks, then three of its own: a hit on two, three computed in that step
    tokens = list(range(2 * BS)) + list(range(500, 500 + 3 * BS + 1))
    keys = conn.sched.hasher.keys(tokens[: 5 * BS], extra_keys())
    slot = conn.sched.leader.host.slot_of(keys[0])
    conn.worker.store.host.array[slot, 7] ^= 0xFF  # G2 block 0 fails its checksum

    second = Request("b", tokens)
    blocks = [10, 11, 12, 13, 14, 15]
    stores, errors = conn.step(second, blocks, lookup=True)
    assert errors == {10}
    assert [op.key for op in stores] == keys[2:5]  # planned, then discarded by the worker
    metrics = conn.sched.metrics
    assert metrics.value(Count.INTEGRITY_FAILURES) == 1
    assert metrics.value(Count.STORES_DISCARDED) == 3
    assert conn.held(keys) == [False, True, False, False, False]

    # vLLM rewinds the request to the failed block and computes it again: stored this time
    second.num_computed_tokens = 0
    stores, errors = conn.step(second, blocks, lookup=False)
    assert not errors
    assert [op.key for op in stores] == [keys[0], *keys[2:5]]  # block 1 was still held
    assert conn.held(keys) == [True] * 5
    assert metrics.value(Count.STORES_DISCARDED) == 3


def test_a_step_without_failures_stores_what_it_computed(conn):
    req = Request("a", list(range(3 * BS + 1)))
    stores, errors = conn.step(req, [0, 1, 2, 3], lookup=True)
    assert len(stores) == 3 and not errors
    assert conn.sched.metrics.value(Count.STORES_DISCARDED) == 0


def test_discard_computed_reports_every_slot_it_gives_up():
    ops = StepOps(
        loads=[LoadOp(1, device_block=5, host_slot=0)],
        stores=[StoreOp(2, 6, host_slot=3), StoreOp(3, 7, disk_slot=9)],
        offloads=[OffloadOp(2, host_slot=3, disk_slot=4), OffloadOp(8, host_slot=1, disk_slot=5)],
        handoffs=[HandoffOp(2, device_block=6, slot=11)],
    )
    kept, report = discard_computed(ops)
    assert kept.loads == ops.loads and not kept.stores and not kept.handoffs
    assert kept.offloads == [OffloadOp(8, host_slot=1, disk_slot=5)]  # an older G2 block
    assert sorted(report.failures) == sorted(
        [(Tier.HOST, 3, 2), (Tier.DISK, 9, 3), (Tier.DISK, 4, 2), (Tier.HANDOFF, 11, 2)]
    )
    assert report.offloads_done == [3]  # the pin its offload held on the G2 slot
    assert report.counts == {Count.STORES_DISCARDED: 3}


def test_a_prefill_rewound_after_its_handoff_hands_its_prompt_off_again(tmp_path):
    """A prefill request whose step failed had its handoff discarded by the worker: when vLLM
    computes the prompt again, the scheduler plans the handoff again (the decode would
    otherwise be sent slots that hold nothing)."""
    import shutil
    import tempfile
    from pathlib import Path

    area = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-rewind-"))
    s = settings(cpu_cache_override_num_blocks=32, handoff_dir=area / "pool")
    sched = SchedulerSide(LAYOUT, s, serve_metrics=False)
    try:
        req = Request("p", list(range(3 * BS + 1)), kv_transfer_params={"dynkv": {"produce": True}})
        blocks = [0, 1, 2, 3]
        external, _ = sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, Blocks(blocks), external)
        first = sched.build_step({"p": req.num_tokens}, lambda _r: blocks)
        assert len(first.ops.handoffs) == 3
        # its load failed: the worker discarded the handoff and reported the slots
        sched.apply_report(discard_computed(first.ops)[1])
        req.num_computed_tokens = 0  # and vLLM rewound it: computed again from the start
        again = sched.build_step({"p": req.num_tokens}, lambda _r: blocks)
        assert [op.key for op in again.ops.handoffs] == [op.key for op in first.ops.handoffs]
        assert sched.request_finished("p") is not None
    finally:
        sched.close()
        shutil.rmtree(area, ignore_errors=True)
