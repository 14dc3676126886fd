"""Load or recompute: how much of a request's matched prefix is worth onboarding (docs/onboard-policy.md).

A KVBM hit is only a win when reading the blocks back costs less than computing them again. On a
fast host tier it always does; a disk behind a slow or busy device can take many times longer
than the engine's own prefill. The scheduler side measures both online and asks `decide` for the
part of each match worth loading:

- `PrefillRates`: the engine's prefill time per token, an EWMA per prefill-length bucket (powers
  of two: attention makes long prefills dearer per token), fed with clean samples — prefills that
  loaded nothing — timed from the step that scheduled them to the step report that finished them;
- `TierRates`: each tier's load time per block (read, verify and the device copy), an EWMA fed by
  the worker's own timings of every load it ran — one that follows a slowdown faster than a
  recovery;
- `decide`: the prefix of the match (vLLM accepts only a contiguous count of tokens from the start)
  with the largest margin × recompute − load, where load includes the G3 reads already planned
  ahead of this request in the same step (its queue). Blocks after that prefix are skipped and the
  reason given per tier: `queue_full` when the queue alone turned the decision, else
  `slower_than_recompute`.

Nothing measured yet — no prefill sample, or no load of a tier — means load (today's behaviour):
a cold start never regresses. A tier estimate older than `probe_secs` counts as unmeasured for
one request, so a disk that was busy for a while is tried again rather than skipped for good.
Pure: the clock is injected, nothing here touches vLLM or the bytes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dynkv.kvbm.events import PrefillRate
from dynkv.kvbm.ops import Tier

ALPHA = 0.3  # weight of a new sample in the EWMAs here
SLOWER_ALPHA = (
    0.7  # ... of a load slower than the estimate: a device turning slow is believed at once
)
MIN_BUCKET = 64  # prefill-length buckets: ≤64, ≤128, ≤256, … tokens


class Policy(StrEnum):
    AUTO = "auto"  # onboard only what beats recomputing it
    ALWAYS = "always"  # onboard every matched block (the behaviour before the policy existed)


class Reason(StrEnum):
    """Why blocks of a match were not onboarded (`kvbm_onboard_skipped_blocks_total{reason}`)."""

    SLOWER = "slower_than_recompute"
    QUEUE = "queue_full"


class Ewma:
    """An exponentially weighted mean and when it was last fed."""

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.updated = -math.inf
        self.samples = 0

    def add(self, sample: float, now: float, alpha: float | None = None) -> None:
        a = self.alpha if alpha is None else alpha
        self.value = sample if self.value is None else self.value + a * (sample - self.value)
        self.updated = now
        self.samples += 1


def bucket(tokens: int) -> int:
    """The bucket of a prefill of `tokens` tokens: 0 for ≤64, 1 for ≤128, …"""
    return max(0, math.ceil(math.log2(max(tokens, 1) / MIN_BUCKET)))


def bucket_bounds(key: int) -> tuple[int, int]:
    """The prefill lengths of bucket `key`, as `min ≤ length < max`."""
    if key <= 0:
        return 0, MIN_BUCKET + 1
    return MIN_BUCKET * 2 ** (key - 1) + 1, MIN_BUCKET * 2**key + 1


class PrefillRates:
    """Seconds per prefill token, by prefill length (the tokens computed: the prompt less what a
    cache supplied). Fed by the scheduler; read by it and by the KV events publisher's thread.

    A bucket not fed for `max_age_s` is left out of what the router is sent, and its next sample
    starts it anew: a worker measured slow during a burst would otherwise never be sent a prompt
    of that length again, and never measured again (the router then prices that length with the
    nearest bucket still fed, else its default, and the next prompt measures it)."""

    def __init__(
        self, max_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._buckets: dict[int, Ewma] = {}
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float, now: float, length: int | None = None) -> None:
        """`tokens` computed in `seconds`, by prefills of `length` tokens (default: one prefill
        of `tokens`; prompts batched into one step are one sample of their summed tokens)."""
        if tokens > 0 and seconds > 0:
            key = bucket(length or tokens)
            with self._lock:
                ewma = self._buckets.get(key)
                if ewma is None or now - ewma.updated > self.max_age_s:
                    ewma = self._buckets[key] = Ewma()
                ewma.add(seconds / tokens, now)

    def per_token(self, tokens: int) -> float | None:
        """The estimate for a prefill of `tokens` tokens: its bucket's, else the nearest
        measured bucket's; None before any sample."""
        with self._lock:
            if not self._buckets:
                return None
            want = bucket(tokens)
            nearest = min(self._buckets, key=lambda b: (abs(b - want), -b))
            return self._buckets[nearest].value

    def published(self) -> list[PrefillRate]:
        """Every bucket fed in the last `max_age_s`, as the router reads it (tokens/s), shortest
        prefills first."""
        now = self.clock()
        with self._lock:
            buckets = sorted(
                (k, e.value, e.samples)
                for k, e in self._buckets.items()
                if now - e.updated <= self.max_age_s
            )
        out = []
        for key, per_token, samples in buckets:
            if per_token:
                low, high = bucket_bounds(key)
                rate = PrefillRate(
                    min_tokens=low, max_tokens=high, tokens_per_s=1.0 / per_token, samples=samples
                )
                out.append(rate)
        return out


class TierRates:
    """Seconds per onboarded block, per tier. An estimate older than `probe_secs` is forgotten:
    the tier is loaded once more and measured anew, not blended with what it was."""

    def __init__(self, probe_secs: float = 30.0) -> None:
        self.probe_secs = probe_secs
        self._tiers: dict[Tier, Ewma] = {}

    def add(self, tier: Tier, blocks: int, seconds: float, now: float) -> None:
        if blocks <= 0 or seconds < 0:
            return
        if self.per_block(tier, now) is None:
            self._tiers[tier] = Ewma()
        ewma, sample = self._tiers[tier], seconds / blocks
        # asymmetric: waiting on a slow disk is the cost this policy exists to avoid, so a
        # slowdown counts almost in full; a recovery is believed gradually
        slower = ewma.value is not None and sample > ewma.value
        ewma.add(sample, now, SLOWER_ALPHA if slower else None)

    def per_block(self, tier: Tier, now: float) -> float | None:
        """None when `tier` was never measured, or not for `probe_secs`."""
        ewma = self._tiers.get(tier)
        if ewma is None or now - ewma.updated > self.probe_secs:
            return None
        return ewma.value


@dataclass(frozen=True)
class Decision:
    """How many leading blocks of a match to onboard, and what skipping the rest means."""

    load: int
    skipped: dict[tuple[Tier, Reason], int] = field(default_factory=dict)
    load_costs: tuple[float, ...] = ()  # estimated seconds per loaded block (0: unmeasured)
    recompute_per_block: float | None = None  # estimated seconds (None: unmeasured)

    def saved_seconds(self, blocks: int | None = None) -> float:
        """Prefill time the first `blocks` onboarded blocks (all by default) spared, minus their
        estimated load time; ≥ 0 (a counter), and 0 while the prefill rate is unmeasured."""
        n = self.load if blocks is None else min(blocks, self.load)
        if self.recompute_per_block is None or n <= 0:
            return 0.0
        return max(0.0, self.recompute_per_block * n - sum(self.load_costs[:n]))


@dataclass
class Estimate:
    """Per-block costs behind one decision (None: not measured, so assumed free to load)."""

    recompute: float | None  # seconds per block recomputed
    load: dict[Tier, float | None]  # seconds per block loaded, per tier
    queued: int  # G3 blocks already planned ahead of this request in the step


def best_prefix(tiers: Sequence[Tier], est: Estimate, margin: float, with_queue: bool) -> int:
    """The number of leading blocks with the largest margin × recompute − load (0 wins ties)."""
    assert est.recompute is not None
    best, best_gain, gain, disk_seen = 0, 0.0, 0.0, False
    for i, tier in enumerate(tiers, start=1):
        per_block = est.load.get(tier) or 0.0
        gain += margin * est.recompute - per_block
        if tier is Tier.DISK and not disk_seen:
            disk_seen = True
            if with_queue:  # the first G3 block waits behind the reads planned before it
                gain -= est.queued * (est.load.get(Tier.DISK) or 0.0)
        if gain > best_gain:
            best, best_gain = i, gain
    return best


class OnboardPolicy:
    """The measurements and the decision, for one scheduler (one leader)."""

    def __init__(
        self,
        policy: Policy | str = Policy.AUTO,
        *,
        margin: float = 0.9,
        probe_secs: float = 30.0,
        block_size: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = Policy(policy)
        self.margin = margin
        self.probe_secs = probe_secs
        self.block_size = block_size
        self.clock = clock
        self.prefill = PrefillRates(probe_secs, clock)
        self.tiers = TierRates(probe_secs)

    # ---- measurements ------------------------------------------------------------------------
    def prefill_done(self, tokens: int, seconds: float, length: int | None = None) -> None:
        self.prefill.add(tokens, seconds, self.clock(), length)

    def load_done(self, tier: Tier, blocks: int, seconds: float) -> None:
        self.tiers.add(tier, blocks, seconds, self.clock())

    def estimate(self, prefill_tokens: int, queued_disk_blocks: int = 0) -> Estimate:
        now = self.clock()
        per_token = self.prefill.per_token(prefill_tokens)
        return Estimate(
            None if per_token is None else per_token * self.block_size,
            {t: self.tiers.per_block(t, now) for t in (Tier.HOST, Tier.DISK)},
            queued_disk_blocks,
        )

    # ---- the decision ------------------------------------------------------------------------
    def decide(
        self, tiers: Sequence[Tier], prefill_tokens: int, queued_disk_blocks: int = 0
    ) -> Decision:
        """`tiers`: the tier of each matched block, in prompt order; `prefill_tokens`: what the
        engine computes if nothing is loaded (the prompt minus vLLM's own prefix-cache hit)."""
        est = self.estimate(prefill_tokens, queued_disk_blocks)
        if self.policy is Policy.ALWAYS or est.recompute is None or not tiers:
            return self._decision(tiers, len(tiers), est, {})
        load = best_prefix(tiers, est, self.margin, with_queue=True)
        if load == len(tiers):
            return self._decision(tiers, load, est, {})
        # would the blocks have been worth it with no reads queued ahead? then the queue skipped them
        unqueued = best_prefix(tiers, est, self.margin, with_queue=False)
        skipped: dict[tuple[Tier, Reason], int] = {}
        for i, tier in enumerate(tiers[load:], start=load):
            reason = Reason.QUEUE if i < unqueued else Reason.SLOWER
            skipped[(tier, reason)] = skipped.get((tier, reason), 0) + 1
        return self._decision(tiers, load, est, skipped)

    @staticmethod
    def _decision(
        tiers: Sequence[Tier], load: int, est: Estimate, skipped: dict[tuple[Tier, Reason], int]
    ) -> Decision:
        costs = tuple(est.load.get(t) or 0.0 for t in tiers[:load])
        return Decision(load, skipped, costs, est.recompute)
