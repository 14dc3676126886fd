"""The onboard policy inside the connector's scheduler half, fed by a real block store.

vLLM's scheduler is played by hand (the hook order of vLLM 0.32: lookup, allocation, the step's
metadata, the worker's report); the store is real — real files for G3, real tensors for G1 — and
the slow disk is the test-layer delay of `dynkv.bench.slow_disk` (the runtime has no hook). The
prefill time is injected through the scheduler's clock; the load times are the store's own
measurements. Decisions and counters are asserted, never timings.
"""

from __future__ import annotations

import pytest
from kvbm_helpers import G1, LAYOUT, Blocks, Request, settings

from dynkv.bench import slow_disk
from dynkv.kvbm.counters import Count
from dynkv.kvbm.store import BlockStore
from dynkv.kvbm.vllm_scheduler import SchedulerSide

BS = LAYOUT.block_size
PROMPT_BLOCKS = 4
PREFILL_SECONDS_PER_TOKEN = 0.002  # injected: 8 ms to recompute one 4-token block


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Engine:
    """One scheduler side and one store, stepped the way vLLM steps them (one request a step)."""

    def __init__(self, tmp_path, **kw) -> None:
        s = settings(disk_cache_dir=tmp_path / "g3", **kw)
        self.g1 = G1()
        self.store = BlockStore(LAYOUT, s)
        self.clock = Clock()
        self.sched = SchedulerSide(LAYOUT, s, serve_metrics=False, clock=self.clock)
        self.n = 0

    def serve(self, tokens: list[int], busy: float = 0.0, params: dict | None = None) -> int:
        """One prompt, prefilled in one step; returns the tokens KVBM supplied."""
        self.n += 1
        req = Request(f"r{self.n}", tokens, kv_transfer_params=params or {})
        ids = list(range(PROMPT_BLOCKS + 1))  # device blocks 0..4
        external, _ = self.sched.get_num_new_matched_tokens(req, 0)
        self.sched.update_state_after_alloc(req, Blocks(ids), external)
        req.num_computed_tokens = external
        plan = self.sched.build_step({req.request_id: len(tokens) - external}, lambda _r: ids)
        failed = self.store.load(plan.ops.loads, self.g1.dev)
        assert not failed
        self.store.store(plan.ops.stores, plan.ops.offloads, self.g1.dev)
        self.store.flush()
        report = self.store.take_report()
        if plan.step >= 0:
            report.steps.append((plan.step, busy))  # what the worker does when asked
        self.clock.now += PREFILL_SECONDS_PER_TOKEN * (len(tokens) - external)
        self.sched.apply_report(report)
        self.sched.request_finished(req.request_id)
        return external

    def skipped(self, **labels) -> float:
        return self.sched.metrics.value(Count.ONBOARD_SKIPPED, **labels)

    def close(self) -> None:
        self.sched.close()
        self.store.close()


@pytest.fixture
def make(tmp_path):
    engines: list[Engine] = []

    def factory(**kw) -> Engine:
        engines.append(Engine(tmp_path / str(len(engines)), **kw))
        return engines[-1]

    yield factory
    slow_disk.uninstall()
    for e in engines:
        e.close()


def prompt(seed: int) -> list[int]:
    return [seed * 1000 + i for i in range(PROMPT_BLOCKS * BS + 1)]


G3_ONLY = {"disk_cache_override_num_blocks": 64}


def test_cold_start_loads_then_a_slow_disk_is_skipped(make):
    e = make(**G3_ONLY)
    slow_disk.install(delay_ms=50)  # 50 ms a block against 8 ms to recompute it
    assert e.serve(prompt(1)) == 0  # cold: computed, stored, the prefill timed
    assert e.serve(prompt(1)) == PROMPT_BLOCKS * BS  # the disk never measured: loaded
    assert e.skipped() == 0
    assert e.serve(prompt(1)) == 0  # measured slower than recompute: left to vLLM
    assert e.skipped(tier="disk", reason="slower_than_recompute") == PROMPT_BLOCKS
    # hit rates still say what the disk held
    assert e.sched.metrics.value(Count.DISK_HIT_BLOCKS) == 2 * PROMPT_BLOCKS


def test_a_fast_disk_keeps_loading_and_counts_savings(make):
    e = make(**G3_ONLY)
    e.serve(prompt(1))
    for _ in range(3):
        assert e.serve(prompt(1)) == PROMPT_BLOCKS * BS
    assert e.skipped() == 0
    assert e.sched.metrics.value(Count.PREFILL_SECONDS_SAVED) > 0


def test_policy_always_loads_the_slow_disk(make):
    e = make(onboard_policy="always", **G3_ONLY)
    slow_disk.install(delay_ms=50)
    e.serve(prompt(1))
    for _ in range(2):
        assert e.serve(prompt(1)) == PROMPT_BLOCKS * BS
    assert e.skipped() == 0
    assert e.sched.metrics.value(Count.ONBOARD_D2D) == 2 * PROMPT_BLOCKS


def test_host_part_loads_and_the_slow_disk_tail_is_skipped(make):
    e = make(cpu_cache_override_num_blocks=8, disable_disk_offload_filter=True, **G3_ONLY)
    slow_disk.install(delay_ms=50)
    tokens = prompt(1)
    keys = e.sched.hasher.keys(tokens[: PROMPT_BLOCKS * BS], ())
    e.serve(tokens)  # cold: every block to G2, and through to G3 (no filter)
    assert e.serve(tokens) == PROMPT_BLOCKS * BS  # G2 measured
    for key in keys:
        e.sched.leader.host.remove(key)
    assert e.serve(tokens) == PROMPT_BLOCKS * BS  # G3 never read: loaded, measured, promoted
    for key in keys[2:]:
        e.sched.leader.host.remove(key)
    assert e.serve(tokens) == 2 * BS  # the G2 half, not the slow G3 tail
    assert e.skipped(tier="disk", reason="slower_than_recompute") == 2
    assert e.skipped(tier="host") == 0


def test_the_connectors_own_save_time_is_not_prefill_time(make):
    e = make(**G3_ONLY)
    tokens = prompt(1)
    e.serve(tokens, busy=0.5 * PREFILL_SECONDS_PER_TOKEN * len(tokens))  # half of it: saving
    est = e.sched.policy.estimate(len(tokens))
    assert est.recompute == pytest.approx(0.5 * PREFILL_SECONDS_PER_TOKEN * BS)


def test_a_load_cut_by_the_read_deadline_costs_its_wait_per_block_delivered(make):
    e = make(disk_read_timeout_ms=100, **G3_ONLY)
    e.serve(prompt(1))
    slow_disk.install(delay_ms=100)  # 4 blocks in one read: 400 ms, past the 100 ms deadline
    report = e.store.take_report()
    keys = e.sched.hasher.keys(prompt(1)[: PROMPT_BLOCKS * BS], ())
    from dynkv.kvbm.ops import LoadOp

    ops = [LoadOp(k, 40 + i, -1, e.sched.leader.disk.slot_of(k)) for i, k in enumerate(keys)]
    failed = e.store.load(ops, e.g1.dev)
    report = e.store.take_report()
    assert len(failed) == PROMPT_BLOCKS  # recomputed
    [(tier, blocks, seconds)] = report.loads
    assert (tier.value, blocks) == ("disk", 1)  # nothing delivered: the wait is one block's cost
    assert seconds >= 0.1


def test_a_request_that_opts_out_is_neither_stored_nor_loaded(make):
    e = make(**G3_ONLY)
    private = {"dynkv": {"offload": False}}
    assert e.serve(prompt(1), params=private) == 0
    assert e.serve(prompt(1)) == 0  # the private request left nothing in the tiers
    assert e.serve(prompt(1)) == PROMPT_BLOCKS * BS  # the one before it was stored
    assert e.serve(prompt(1), params=private) == 0  # held, but not looked up for it
    assert e.sched.metrics.value(Count.DISK_HIT_BLOCKS) == PROMPT_BLOCKS
