"""The rates a worker publishes for the router: its measured prefill speed and decode cost.

`DecodeCost` is fed plan times by hand; the scheduler half is played as vLLM plays it (lookup,
allocation, step metadata, report) with an injected clock, and its rates source is read as the
KV events publisher reads it. Timings are injected, never measured.
"""

from __future__ import annotations

import pytest
from kvbm_helpers import LAYOUT, Blocks, Request, settings

from dynkv.kvbm.decode_cost import DecodeCost
from dynkv.kvbm.onboard_policy import PrefillRates, bucket, bucket_bounds
from dynkv.kvbm.ops import StoreReport
from dynkv.kvbm.vllm_scheduler import SchedulerSide


def test_back_to_back_decode_steps_are_priced_per_running_request():
    cost = DecodeCost(alpha=1.0)
    assert cost.seconds_per_request is None
    cost.planned(10.0, ["a", "b"], decode_only=True)
    cost.planned(10.02, ["a", "b"], decode_only=True)  # 20 ms for two requests
    assert cost.seconds_per_request == pytest.approx(0.01)
    cost.planned(10.05, ["a", "b", "c"], decode_only=True)  # 30 ms for the same two
    assert cost.seconds_per_request == pytest.approx(0.015)
    assert cost.samples == 2


def test_idle_gaps_and_prompt_steps_are_not_decode_samples():
    cost = DecodeCost(alpha=1.0)
    cost.planned(0.0, ["a"], decode_only=True)
    cost.planned(5.0, ["b"], decode_only=True)  # a finished, the engine idled, b arrived
    assert cost.seconds_per_request is None
    cost.planned(5.5, ["b", "c"], decode_only=False)  # b's step was decode-only: a sample
    assert cost.seconds_per_request == pytest.approx(0.5)
    cost.planned(9.0, ["b", "c"], decode_only=True)  # after a step computing c's prompt: none
    assert cost.samples == 1
    cost.planned(9.1, [], decode_only=True)  # nothing scheduled: no sample, and no start
    cost.planned(9.2, ["b"], decode_only=True)
    assert cost.samples == 1


def test_prefill_buckets_publish_tokens_per_second_over_the_lengths_they_hold():
    clock = [1.0]
    rates = PrefillRates(max_age_s=30.0, clock=lambda: clock[0])
    assert rates.published() == []
    rates.add(50, 0.01, now=0)  # 5,000 tokens/s for ≤ 64 tokens
    rates.add(1000, 0.5, now=0)  # 2,000 tokens/s for 513–1024 tokens
    rates.add(1000, 0.25, now=1)
    short, long = rates.published()
    assert (short.min_tokens, short.max_tokens, short.samples) == (0, 65, 1)
    assert short.tokens_per_s == pytest.approx(5000)
    assert (long.min_tokens, long.max_tokens, long.samples) == (513, 1025, 2)
    assert 2000 < long.tokens_per_s < 4000  # the EWMA of 2,000 and 4,000
    for n in (1, 64, 65, 128, 129, 1024, 1025, 5000):
        low, high = bucket_bounds(bucket(n))
        assert low <= n < high

    # a bucket not fed for 30 s is not sent (the router probes that length again), and its next
    # sample starts it anew rather than blending with what it was
    clock[0] = 30.5
    assert [r.max_tokens for r in rates.published()] == [1025]
    rates.add(50, 0.05, now=31.0)  # 1,000 tokens/s now
    clock[0] = 31.0
    assert rates.published()[0].tokens_per_s == pytest.approx(1000)
    assert rates.published()[0].samples == 1


def test_the_scheduler_publishes_its_measured_prefill_and_decode_costs(tmp_path):
    clock = [100.0]
    sched = SchedulerSide(
        LAYOUT,
        settings(disk_cache_dir=tmp_path, cpu_cache_override_num_blocks=64),
        serve_metrics=False,
        clock=lambda: clock[0],
    )
    try:
        before = sched.rates()
        assert before.prefill == [] and before.decode_seconds_per_request is None
        bs = LAYOUT.block_size
        req = Request("r1", list(range(4 * bs + 1)))
        ids = list(range(5))
        external, _ = sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, Blocks(ids), external)
        plan = sched.build_step({"r1": req.num_tokens}, lambda _r: ids)
        clock[0] += 0.2  # the prompt computes in 200 ms
        req.num_computed_tokens = req.num_tokens
        report = StoreReport(steps=[(plan.step, 0.0)])  # what the worker reports of the step
        sched.apply_report(report)
        for _ in range(3):  # then it decodes, a step each 30 ms
            sched.build_step({"r1": 1}, lambda _r: ids)
            clock[0] += 0.03
        rates = sched.rates()
        assert [r.tokens_per_s for r in rates.prefill] == [pytest.approx(req.num_tokens / 0.2)]
        # the first decode plan follows the prompt's step: only the next two are samples
        assert rates.decode_seconds_per_request == pytest.approx(0.03)
        assert sched.decode_cost.samples == 2
    finally:
        sched.close()
