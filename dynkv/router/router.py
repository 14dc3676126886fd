"""The KV-aware routing policy as a frontend uses it: events in, one decision per request.

`KvRouter` owns the index, its sync and the NATS subscriber. `pick(prompt, loads)` (and
`estimate`, the same answer without a trace) computes the prompt's block keys the way the
workers do (`BlockHasher` rooted in the model fingerprint each worker announces in its rates,
and the runtime's extra-key convention), matches them and chooses by estimated TTFT. While
NATS is unreachable it falls back to the least loaded worker (one log line per outage;
`decisions["nats_down"]` counts them) and the index resynchronises by itself once NATS is back
(docs/kv-events.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dynkv.kvbm.keys import BlockHasher, extra_keys
from dynkv.router.decide import Decision, observe_boundary, reason_of
from dynkv.router.heat import PrefixHeat
from dynkv.router.index import KvIndex, PrefixMatch
from dynkv.router.inflight import InFlight, with_in_flight
from dynkv.router.score import (
    Estimate,
    ScorerConfig,
    WorkerLoad,
    choose,
    estimate_all,
)
from dynkv.router.subscriber import KvEventSubscriber
from dynkv.router.sync import IndexSync
from dynkv.router.tasks import cancel_and_wait

log = logging.getLogger("dynkv.router")


@dataclass(frozen=True)
class Prompt:
    """What a prompt's block keys hang on: its tokens, and what the runtime folds into the first
    block's key besides (a tenant's `cache_salt`, a LoRA adapter as `(name, path)`), so that
    equal tokens of another tenant or adapter match nothing."""

    token_ids: Sequence[int]
    cache_salt: str | None = None
    lora: tuple[str, str] | None = None


class KvRouter:
    def __init__(
        self,
        nats_url: str,
        deployment: str,
        cfg: ScorerConfig | None = None,
        *,
        max_blocks: int = 2_000_000,
        rng: random.Random | None = None,
        snapshot_timeout: float = 2.0,
        retry_secs: float = 0.5,
    ) -> None:
        self.cfg = cfg or ScorerConfig()
        self.index = KvIndex(max_blocks)
        self.sync = IndexSync(self.index)
        self.inflight = InFlight()
        # requests per prefix boundary, to price replicas (Dynamo's weights know none)
        self.heat = (
            PrefixHeat(self.cfg.replica_half_life_s)
            if self.cfg.replica_half_life_s > 0 and self.cfg.tier_weights is None
            else None
        )
        self.subscriber = KvEventSubscriber(
            nats_url,
            deployment,
            self.sync,
            snapshot_timeout=snapshot_timeout,
            retry_secs=retry_secs,
        )
        self.rng = rng or random.Random()
        self.retry_secs = retry_secs
        self.decisions: Counter[str] = Counter()  # reason → count
        self._hashers: dict[tuple[str, int], BlockHasher] = {}
        self._connect_task: asyncio.Task | None = None
        self._down_logged = False

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect in the background (retrying): the router serves by load until it is fed."""
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        while True:
            try:
                await self.subscriber.start()
                return
            except Exception as exc:
                self._log_down(f"cannot reach NATS at {self.subscriber.nats_url} ({exc})")
                await asyncio.sleep(self.retry_secs)

    async def close(self) -> None:
        task, self._connect_task = self._connect_task, None
        if task is not None:
            await cancel_and_wait([task])  # it may be in nats-py's first connection, for ever
        await self.subscriber.close()

    @property
    def connected(self) -> bool:
        return self.subscriber.connected

    def remove_worker(self, worker: str) -> None:
        """The worker left etcd: forget its blocks and rates."""
        self.subscriber.remove_worker(worker)
        self.inflight.drop_worker(worker)

    # ---- decisions -------------------------------------------------------------------------------
    def prompt_keys(self, prompt: Prompt, fingerprint: str, block_size: int) -> list[int]:
        hasher = self._hashers.get((fingerprint, block_size))
        if hasher is None:
            hasher = self._hashers[(fingerprint, block_size)] = BlockHasher(
                bytes.fromhex(fingerprint), block_size
            )
        lora_name, lora_path = prompt.lora if prompt.lora is not None else (None, "")
        return hasher.keys(prompt.token_ids, extra_keys(prompt.cache_salt, lora_name, lora_path))

    def pick(self, prompt: Prompt, loads: Mapping[str, WorkerLoad]) -> Decision:
        """Choose among `loads` (the healthy workers and what each has outstanding) for a request
        about to be sent: the decision is counted, the prompt heats its prefix, and its blocks are
        recorded as headed to the chosen worker."""
        return self._decide(prompt, loads, commit=True)

    def estimate(self, prompt: Prompt, loads: Mapping[str, WorkerLoad]) -> Decision:
        """What `pick` would decide now, with no trace: nothing counted, heated or recorded. For
        whoever asks without sending (a probe, a test polling the index): a `pick` per poll
        would record the prompt as headed to a worker, and the next poll would find it there."""
        return self._decide(prompt, loads, commit=False)

    def _decide(self, prompt: Prompt, loads: Mapping[str, WorkerLoad], *, commit: bool) -> Decision:
        if not loads:
            raise ValueError("no worker to choose from")
        prompt_tokens = len(prompt.token_ids)
        t0 = time.perf_counter()
        if not self.connected:
            self._log_down("NATS is unreachable")
            chosen = self._least_loaded(loads, prompt_tokens)
            return self._done("nats_down", chosen, [chosen], t0, commit)
        self._down_logged = False
        # workers whose keys share a root (model fingerprint, block size) are matched together
        groups: dict[tuple[str, int], list[str]] = {}
        for w in loads:
            rates = self.sync.rates.get(w)
            if rates is not None and rates.fingerprint and self.sync.synced(w):
                groups.setdefault((rates.fingerprint, rates.block_size), []).append(w)
        matches: dict[str, PrefixMatch] = {}
        keys_of: dict[str, list[int]] = {}
        block_size = 0
        for (fingerprint, bs), workers in groups.items():
            keys = self.prompt_keys(prompt, fingerprint, bs)
            found = self.index.match(keys)
            for w in workers:
                keys_of[w] = keys
                match = with_in_flight(found.get(w), self.inflight.run(w, keys))
                if match is not None:
                    matches[w] = match
            block_size = bs
        if not block_size:  # no worker announced its keys yet: nothing matched, any size will do
            block_size = 16
        heat = observe_boundary(
            self.heat,
            matches,
            loads,
            prompt_tokens,
            block_size,
            keys_of.__getitem__,
            count=commit,
        )
        estimates = estimate_all(
            matches, prompt_tokens, block_size, loads, self.sync.rates, self.cfg, heat
        )
        chosen = choose(estimates, self.cfg.temperature, self.rng)
        decision = self._done(reason_of(chosen), chosen, estimates, t0, commit)
        decision.heat = heat
        if commit and chosen.worker in keys_of:  # later prompts with this prefix find it there
            decision.in_flight = self.inflight.add(chosen.worker, keys_of[chosen.worker])
        return decision

    def prefilled(self, decision: Decision) -> None:
        """The decision's request got its first byte: its blocks are computed on the worker."""
        if decision.in_flight is not None:
            self.inflight.prefilled(decision.in_flight)

    def _least_loaded(self, loads: Mapping[str, WorkerLoad], prompt_tokens: int) -> Estimate:
        def key(w: str) -> tuple[int, int]:
            return loads[w].outstanding_prefill_tokens, loads[w].running_requests

        best = min(key(w) for w in loads)
        worker = self.rng.choice([w for w in loads if key(w) == best])
        return Estimate(worker, 0.0, 0, PrefixMatch(), 0.0, 0.0, 0.0)

    def _done(
        self, reason: str, chosen: Estimate, estimates: list[Estimate], t0: float, commit: bool
    ) -> Decision:
        if commit:
            self.decisions[reason] += 1
        return Decision(chosen, estimates, time.perf_counter() - t0, reason)

    def _log_down(self, why: str) -> None:
        if not self._down_logged:
            log.warning("router: %s; routing by load until KV events flow again", why)
            self._down_logged = True

    def stats(self) -> dict[str, object]:
        """Index size and memory, sync counters and decisions (for metrics and `status`)."""
        return {
            "index_blocks": len(self.index),
            "index_memory_bytes": self.index.memory_bytes(),
            "in_flight_prompts": len(self.inflight),
            "hot_prefixes": len(self.heat) if self.heat is not None else 0,
            "evicted_blocks": self.index.evicted_blocks,
            "acquired_blocks": dict(self.index.acquired),
            "duplicated_blocks": dict(self.index.duplicated),
            "workers": self.index.workers,
            "sync": vars(self.sync.counters).copy(),
            "decisions": dict(self.decisions),
            "connected": self.connected,
        }
