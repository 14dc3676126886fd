"""The router's record of prompts it has just sent: matched as G1 blocks on their worker until
the first byte plus a grace period (or a maximum age), then forgotten."""

from __future__ import annotations

from dynkv.router.index import PrefixMatch
from dynkv.router.inflight import InFlight, with_in_flight


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_sent_prompt_is_matched_on_its_worker_only_by_its_leading_blocks():
    f = InFlight(clock=Clock())
    f.add("w0", [1, 2, 3])
    assert f.run("w0", [1, 2, 3, 4]) == 3
    assert f.run("w0", [1, 2, 9, 3]) == 2
    # (block keys are chained: a key stands for its whole prefix, so membership is enough)
    assert f.run("w1", [1, 2, 3]) == 0


def test_a_record_lasts_until_the_first_byte_plus_grace_or_its_maximum_age():
    clock = Clock()
    f = InFlight(grace_s=2.0, max_age_s=60.0, clock=clock)
    a = f.add("w0", [1, 2])
    f.add("w0", [1, 2, 3])
    f.prefilled(a)
    clock.now += 1.9
    assert f.run("w0", [1, 2, 3]) == 3
    clock.now += 0.2  # a's grace is over; the other record still holds 1, 2 and 3
    assert f.run("w0", [1, 2, 3]) == 3 and len(f) == 1
    clock.now += 58.0  # the other never got a first byte: gone at its maximum age
    assert f.run("w0", [1]) == 0 and len(f) == 0
    f.prefilled(a)  # a record already gone: nothing happens


def test_a_worker_that_leaves_takes_its_records_along():
    f = InFlight(clock=Clock())
    f.add("w0", [1])
    f.add("w1", [1])
    f.drop_worker("w0")
    assert f.run("w0", [1]) == 0 and f.run("w1", [1]) == 1 and len(f) == 1


def test_in_flight_blocks_count_as_g1_and_replace_slower_copies_first():
    assert with_in_flight(None, 0) is None
    assert with_in_flight(None, 4) == PrefixMatch(device=4)
    held = PrefixMatch(device=1, host=2, disk=3)
    assert with_in_flight(held, 0) is held
    assert with_in_flight(held, 2) == PrefixMatch(device=2, host=1, disk=3)
    assert with_in_flight(held, 4) == PrefixMatch(device=4, host=0, disk=2)
    assert with_in_flight(held, 6) == PrefixMatch(device=6)
    assert with_in_flight(held, 9) == PrefixMatch(device=9)
