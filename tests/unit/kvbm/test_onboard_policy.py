"""Load or recompute (docs/onboard-policy.md): the estimators and the decision, with an injected
clock and injected rates. Decisions and counters are asserted, never timings."""

from __future__ import annotations

import pytest

from dynkv.kvbm.onboard_policy import (
    Decision,
    Ewma,
    OnboardPolicy,
    Policy,
    PrefillRates,
    Reason,
    TierRates,
    bucket,
)
from dynkv.kvbm.ops import Tier

H, D = Tier.HOST, Tier.DISK


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(clock=None, **kw) -> OnboardPolicy:
    return OnboardPolicy(kw.pop("mode", Policy.AUTO), clock=clock or Clock(), block_size=32, **kw)


def measured(
    *, per_token: float = 0.001, host: float | None = None, disk: float | None = None, **kw
) -> OnboardPolicy:
    """A policy whose prefill costs `per_token` s/token (32 per block) and whose tiers cost
    `host` / `disk` s/block (None: never measured)."""
    p = policy(**kw)
    p.prefill_done(1024, per_token * 1024)
    if host is not None:
        p.load_done(H, 10, host * 10)
    if disk is not None:
        p.load_done(D, 10, disk * 10)
    return p


def test_ewma_starts_at_the_first_sample_then_follows():
    e = Ewma(alpha=0.5)
    e.add(4.0, now=1)
    assert e.value == 4.0 and e.updated == 1
    e.add(2.0, now=2)
    assert e.value == 3.0


def test_prefill_buckets_by_length_and_falls_back_to_the_nearest():
    assert [bucket(n) for n in (1, 64, 65, 128, 129, 4096)] == [0, 0, 1, 1, 2, 6]
    rates = PrefillRates()
    assert rates.per_token(100) is None
    rates.add(1000, 1.0, now=0)  # bucket 4: 1 ms/token
    assert rates.per_token(1000) == pytest.approx(0.001)
    assert rates.per_token(50) == pytest.approx(0.001)  # only bucket measured
    rates.add(100, 0.05, now=0)  # bucket 1: 0.5 ms/token
    assert rates.per_token(90) == pytest.approx(0.0005)
    assert rates.per_token(3000) == pytest.approx(0.001)
    rates.add(0, 1.0, now=0)  # nothing computed: no sample
    rates.add(10, 0.0, now=0)
    assert rates.per_token(10) == pytest.approx(0.0005)


def test_tier_rates_expire_into_a_probe():
    rates = TierRates(probe_secs=30)
    rates.add(D, 4, 0.4, now=10)
    assert rates.per_block(D, now=20) == pytest.approx(0.1)
    assert rates.per_block(D, now=41) is None  # stale: load once, measure again
    assert rates.per_block(H, now=20) is None
    rates.add(D, 1, 0.001, now=41)  # the new measure replaces the stale one
    assert rates.per_block(D, now=41) == pytest.approx(0.001)


def test_a_slowdown_is_believed_faster_than_a_recovery():
    rates = TierRates()
    rates.add(D, 1, 0.001, now=0)
    rates.add(D, 1, 0.101, now=1)  # slower: 70% of the way
    assert rates.per_block(D, now=1) == pytest.approx(0.071)
    rates.add(D, 1, 0.001, now=2)  # faster: 30% of the way
    assert rates.per_block(D, now=2) == pytest.approx(0.071 - 0.3 * 0.070)


def test_cold_start_loads_everything():
    p = policy()
    assert p.decide([H, H, D, D], 200).load == 4  # nothing measured
    p.load_done(D, 10, 100.0)  # a dreadful disk, but no prefill measured yet
    assert p.decide([H, D], 200) == Decision(2, {}, (0.0, 10.0), None)


def test_unmeasured_tier_is_loaded_to_measure_it():
    p = measured(host=0.0001)  # the disk was never read
    assert p.decide([H, D, D], 200).load == 3


def test_fast_tiers_are_loaded_whole():
    p = measured(host=0.0001, disk=0.002)  # recompute: 32 ms a block
    d = p.decide([H, H, D, D], 200)
    assert d.load == 4 and d.skipped == {}
    assert d.saved_seconds() == pytest.approx(4 * 0.032 - 2 * 0.0001 - 2 * 0.002)
    assert d.saved_seconds(1) == pytest.approx(0.032 - 0.0001)


def test_slow_disk_is_skipped_after_the_host_part():
    p = measured(host=0.0001, disk=0.5)
    d = p.decide([H, H, D, D, D], 200)
    assert d.load == 2
    assert d.skipped == {(D, Reason.SLOWER): 3}
    assert d.saved_seconds() == pytest.approx(2 * (0.032 - 0.0001))


def test_margin_decides_a_near_tie():
    # 30 ms a block to load, 32 to recompute: worth it only with a margin above 30/32
    assert measured(disk=0.030, margin=0.9).decide([D], 200).load == 0
    assert measured(disk=0.030, margin=1.0).decide([D], 200).load == 1


def test_a_disk_slower_than_recompute_in_the_middle_stops_the_prefix():
    p = measured(host=0.0001, disk=0.5)
    d = p.decide([H, D, H, H], 200)  # contiguous from the start only: the host tail is lost
    assert d.load == 1
    assert d.skipped == {(D, Reason.SLOWER): 1, (H, Reason.SLOWER): 2}


def test_a_busy_disk_queue_is_named():
    p = measured(disk=0.010)  # 10 ms a block: worth loading on an idle disk
    assert p.decide([D, D], 200, queued_disk_blocks=0).load == 2
    d = p.decide([D, D], 200, queued_disk_blocks=50)  # 500 ms of reads ahead of it
    assert d.load == 0
    assert d.skipped == {(D, Reason.QUEUE): 2}


def test_many_disk_blocks_amortise_the_queue():
    p = measured(disk=0.010)
    # 2 blocks queued ahead: 20 ms once; each block gains 0.9*32-10 = 18.8 ms
    assert p.decide([D], 200, queued_disk_blocks=2).load == 0
    assert p.decide([D, D], 200, queued_disk_blocks=2).load == 2


def test_longer_prefills_use_their_own_rate():
    p = policy()
    p.prefill_done(4096, 4096 * 0.004)  # long prompts: 4 ms/token, 128 ms a block
    p.prefill_done(128, 128 * 0.0001)  # short prompts: 3.2 ms a block
    p.load_done(D, 10, 10 * 0.020)  # 20 ms a block
    assert p.decide([D], 4000).load == 1
    assert p.decide([D], 100).load == 0


def test_policy_always_loads_everything_and_counts_savings():
    p = measured(disk=0.5, mode="always")
    d = p.decide([D, D], 200)
    assert d.load == 2 and d.skipped == {}
    assert d.saved_seconds() == 0.0  # slower than recompute: nothing saved (never negative)


def test_a_stale_disk_estimate_is_probed_again():
    clock = Clock()
    p = measured(disk=0.5, clock=clock, probe_secs=30)
    assert p.decide([D], 200).load == 0
    clock.now += 31
    assert p.decide([D], 200).load == 1  # probe: the load re-measures the disk
    p.load_done(D, 1, 0.001)  # the disk recovered
    assert p.decide([D], 200).load == 1


def test_settings_parse_the_policy(monkeypatch):
    from dynkv.kvbm.config import KvbmSettings

    assert KvbmSettings().onboard_policy == "auto"
    monkeypatch.setenv("DYN_KVBM_ONBOARD_POLICY", "always")
    monkeypatch.setenv("DYN_KVBM_ONBOARD_MARGIN", "0.8")
    s = KvbmSettings()
    assert (s.onboard_policy, s.onboard_margin) == ("always", 0.8)
    monkeypatch.setenv("DYN_KVBM_ONBOARD_POLICY", "sometimes")
    with pytest.raises(ValueError):
        KvbmSettings()


def test_a_batched_step_is_one_sample_of_its_summed_tokens():
    rates = PrefillRates()
    rates.add(900, 0.9, now=0, length=300)  # three 300-token prompts in one 0.9 s step
    assert rates.per_token(300) == pytest.approx(0.001)
