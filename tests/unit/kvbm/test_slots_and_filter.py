"""Pool bookkeeping and the SSD filter: invariants checked with hypothesis against simple models."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynkv.kvbm.filter import SWEEP, FrequencyFilter
from dynkv.kvbm.slots import PoolFull, SlotIndex


class SlotIndexMachine(RuleBasedStateMachine):
    """Random reserve/publish/pin/unpin/remove sequences against a reference LRU model."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 5
        self.index = SlotIndex(self.capacity)
        self.model: OrderedDict[int, int] = OrderedDict()  # key -> slot, LRU first
        self.reserved: list[int] = []
        self.pins: dict[int, int] = {}
        self.next_key = 1

    @rule()
    def reserve(self):
        unpinned = [k for k, s in self.model.items() if not self.pins.get(s)]
        free_expected = self.capacity - len(self.model) - len(self.reserved) - self._orphans()
        try:
            slot, evicted = self.index.reserve()
        except PoolFull:
            assert free_expected == 0 and not unpinned
            return
        if free_expected > 0:
            assert evicted is None
        else:
            assert evicted == unpinned[0]  # least recently used unpinned block
            del self.model[evicted]
        assert slot not in self.model.values() and slot not in self.reserved
        self.reserved.append(slot)

    def _orphans(self) -> int:
        return len(self.index._orphans)

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def publish(self, data):
        slot = self.reserved.pop(data.draw(st.integers(0, len(self.reserved) - 1)))
        key = self.next_key
        self.next_key += 1
        assert self.index.publish(slot, key) is None
        self.model[key] = slot

    @precondition(lambda self: self.reserved)
    @rule()
    def release(self):
        self.index.release(self.reserved.pop())

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def touch(self, data):
        key = data.draw(st.sampled_from(list(self.model)))
        self.index.touch(key)
        self.model.move_to_end(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin(self, data):
        key = data.draw(st.sampled_from(list(self.model)))
        slot = self.model[key]
        self.index.pin(slot)
        self.pins[slot] = self.pins.get(slot, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        slot = data.draw(st.sampled_from([s for s, n in self.pins.items() if n]))
        self.index.unpin(slot)
        self.pins[slot] -= 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        key = data.draw(st.sampled_from(list(self.model)))
        slot = self.model.pop(key)
        assert self.index.remove(key) == slot

    @invariant()
    def capacity_never_exceeded_and_no_slot_twice(self):
        indexed = [self.index.slot_of(k) for k in self.index.keys_lru()]
        assert len(indexed) == len(set(indexed))
        assert set(indexed).isdisjoint(self.reserved)
        assert self.index.used + self.index.free_count == self.capacity
        assert self.index.keys_lru() == list(self.model)


TestSlotIndex = SlotIndexMachine.TestCase
TestSlotIndex.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_restore_rebuilds_index_and_free_list():
    index = SlotIndex(4)
    index.restore([(10, 2), (11, 0), (12, 2), (13, 9)])  # duplicate slot and out-of-range dropped
    assert index.keys_lru() == [10, 11]
    slot, evicted = index.reserve()
    assert slot in (1, 3) and evicted is None


# ---- SSD frequency filter ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_filter_arithmetic():
    clock = Clock()
    f = FrequencyFilter(decay_secs=600, max_entries=10, clock=clock)
    assert f.observe(1) == 1 and not f.should_offload(1)  # first sighting
    assert f.observe(1) == 2 and f.should_offload(1)  # a hit doubles
    assert f.observe(1) == 4
    clock.now = 600  # one period: every frequency drops by 1
    assert f.frequency(1) == 3
    clock.now = 1800  # two more periods
    assert f.frequency(1) == 1 and not f.should_offload(1)
    clock.now = 2400
    assert f.frequency(1) == 0 and len(f) == 0  # zeros are forgotten


def test_filter_periods_start_with_the_filter():
    """A filter created 0.1 s before the monotonic clock passes a multiple of the period: a block
    seen on both sides of that moment has been seen twice (its first period is not over)."""
    clock = Clock()
    clock.now = 599.9
    f = FrequencyFilter(decay_secs=600, max_entries=10, clock=clock)
    f.observe(1)
    clock.now = 600.1
    assert f.observe(1) == 2 and f.should_offload(1)
    clock.now = 599.9 + 600  # the filter's first period ends
    assert f.frequency(1) == 1


def test_a_period_end_walks_no_table():
    """Decay is per entry: when a period ends, the entries that decayed to zero read as never
    seen at once, and are dropped a few per call (SWEEP) instead of in one pass over the whole
    table inside the scheduler's step; entries still alive keep their place."""
    clock = Clock()
    f = FrequencyFilter(decay_secs=600, max_entries=1000, clock=clock)
    for key in range(100):
        f.observe(key)
    f.observe(100)
    f.observe(100)  # frequency 2: alive after one period
    clock.now = 600
    assert f.frequency(5) == 0 and f.frequency(100) == 1
    assert len(f) == 101 - 2 * SWEEP  # two calls, SWEEP dropped by each
    assert f.observe(7) == 1  # a decayed entry counts as never seen
    while len(f) > 2:
        f.frequency(0)
    assert f.frequency(100) == 1 and f.frequency(7) == 1


def test_filter_table_is_bounded_lru():
    f = FrequencyFilter(decay_secs=600, max_entries=3, clock=Clock())
    for key in (1, 2, 3):
        f.observe(key)
    f.observe(1)  # 1 is now most recent
    f.observe(4)  # evicts 2, the least recently seen
    assert len(f) == 3 and f.frequency(2) == 0 and f.frequency(1) == 2


@given(
    events=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 2000, allow_nan=False)), max_size=60)
)
@settings(max_examples=200, deadline=None)
def test_filter_matches_a_reference_model(events):
    clock = Clock()
    period = 100.0
    f = FrequencyFilter(decay_secs=period, max_entries=1000, clock=clock)
    ref: dict[int, int] = {}
    last_period = 0
    now = 0.0
    for key, dt in events:
        now += dt
        clock.now = now
        p = int(now // period)
        if p > last_period:
            ref = {k: v - (p - last_period) for k, v in ref.items() if v - (p - last_period) > 0}
            last_period = p
        ref[key] = 1 if key not in ref else ref[key] * 2
        assert f.observe(key) == ref[key]
        assert f.should_offload(key) == (ref[key] >= 2)


def test_filter_rejects_bad_parameters():
    with pytest.raises(ValueError):
        FrequencyFilter(decay_secs=0)
