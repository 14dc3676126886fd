"""The scheduler half of the vLLM connector: lookups, and the plan of each step's transfers.

Lives in vLLM's EngineCore process beside the scheduler, and owns the `BlockLeader`:
- `get_num_new_matched_tokens`: how many tokens beyond vLLM's own prefix-cache hit KVBM holds,
  in full blocks, leaving at least one prompt token to compute (vLLM needs one); no side effects;
- `update_state_after_alloc`: plans the loads into the device blocks vLLM just allocated;
- `build_connector_meta`: plans the write-through of every block that becomes full in this step
  (prompt and generated tokens alike) and hands the step's ops to the worker;
- `update_connector_output`: applies the worker's report (failures, finished disk writes).
Of a match, only the leading part worth loading is returned (`OnboardPolicy`,
docs/onboard-policy.md): the load costs the worker reports and the prefills timed here, from
the step that schedules a prompt's first chunk to the report of the step that finishes it, are
the policy's measurements.
Keys are this runtime's own (`BlockHasher`), not vLLM's block hashes, so they are stable across
processes, restarts and vLLM versions, and carry the request's cache salt and LoRA name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.counters import Count
from dynkv.kvbm.decode_cost import DecodeCost
from dynkv.kvbm.event_publisher import start_from_env
from dynkv.kvbm.event_rates import metrics_rates
from dynkv.kvbm.g1_bridge import start_for as start_g1_bridge
from dynkv.kvbm.journal import Journal
from dynkv.kvbm.keys import BlockHasher, extra_keys
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.leader import BlockLeader, tier_sizes
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.kvbm.onboard_policy import OnboardPolicy
from dynkv.kvbm.ops import StoreReport, Tier
from dynkv.kvbm.scheduler_state import MAX_TIMED_STEPS, RequestState, StepPlan

log = logging.getLogger("dynkv.kvbm")


class SchedulerSide:
    def __init__(
        self,
        layout: BlockLayout,
        settings: KvbmSettings,
        *,
        world_size: int = 1,
        metrics: KvbmMetrics | None = None,
        serve_metrics: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.handoff_ttl = settings.handoff_ttl_secs
        self.handoff_pool = settings.handoff_pool or ""  # the id this worker's handoffs carry
        self.readable_pools = frozenset(settings.readable_pools)
        self.hasher = BlockHasher(layout.fingerprint(), layout.block_size)
        entries = []
        _host, disk_slots = tier_sizes(layout, settings)
        if disk_slots:
            # the worker (created before the scheduler) has already replayed and compacted it
            journal = Journal(
                settings.disk_cache_dir, layout.fingerprint(), layout.slot_stride, disk_slots
            )
            entries = [(e.key, e.slot) for e in journal.read()]
        self.leader = BlockLeader(
            layout, settings, metrics=metrics, disk_entries=entries, workers=world_size
        )
        self.metrics = self.leader.metrics
        if serve_metrics if serve_metrics is not None else settings.metrics:
            self.metrics.serve_or_warn(settings.metrics_host, settings.metrics_port)
        self.metrics.start_log_thread(settings.cache_stats_log_interval_secs)
        self._requests: dict[str, RequestState] = {}
        self._plan = StepPlan()
        self.clock = clock
        self.policy = OnboardPolicy(
            settings.onboard_policy,
            margin=settings.onboard_margin,
            probe_secs=settings.onboard_probe_secs,
            block_size=self.block_size,
            clock=clock,
        )
        self.decode_cost = DecodeCost()
        # what the router prices this worker with: its measured loads, prefill speed, decode cost
        self.rates = metrics_rates(
            self.metrics, self.block_size, self.policy.prefill, self.decode_cost
        )
        # KV events for the router (docs/kv-events.md); None unless DYNKV_KV_EVENTS_NATS_URL is set
        self.events = start_from_env(
            self.leader, self.block_size, layout.fingerprint_hex(), self.rates
        )
        # and vLLM's own (G1) events, bridged into the same stream when the plan enabled them
        self.g1_events = start_g1_bridge(self.events, self.hasher)
        self._queued_disk = 0  # G3 blocks planned for loading in the step being built
        self._step = 0
        self._timed: dict[int, list[tuple[int, float]]] = {}  # step -> (tokens, start) samples
        if entries:
            log.info("KVBM: %d blocks on disk are available from an earlier run", len(entries))

    # ---- request tracking ------------------------------------------------------------------------
    def _state(self, request: Any) -> RequestState:
        st = self._requests.get(request.request_id)
        if st is None or st.request is not request:
            lora = getattr(request, "lora_request", None)
            extra = extra_keys(
                request.cache_salt,
                lora.lora_name if lora is not None else None,
                getattr(lora, "lora_path", "") if lora is not None else "",
            )
            skip = bool(getattr(request, "mm_features", None)) or (
                getattr(request, "prompt_embeds", None) is not None
            )
            st = RequestState(request, extra, skip=skip)
            self._read_transfer_params(st)
            self._requests[request.request_id] = st
        return st

    def _read_transfer_params(self, st: RequestState) -> None:
        """`kv_transfer_params["dynkv"]` (docs/kvbm.md): {"offload": false} keeps a request out
        of the tiers; {"produce": true} asks a prefill for a handoff; a decode request carries
        what its prefill returned. What does not match this engine (another model or block
        size, expired, malformed, a pool not in DYN_KVBM_HANDOFF_POOLS) is ignored: the decode
        recomputes. The params come from the network: nothing in them is used unchecked."""
        params = getattr(st.request, "kv_transfer_params", None) or {}
        ours = params.get("dynkv") if isinstance(params, dict) else None
        if not isinstance(ours, dict):
            return
        if ours.get("offload") is False:
            st.skip = True
            return
        if ours.get("produce") is True:
            if self.leader.handoff is None:
                log.warning(
                    "KVBM: a prefill request asked for a handoff but this worker has no handoff "
                    "pool of its own (DYN_KVBM_HANDOFF_DIR unset, or a decode worker)"
                )
            else:
                st.produce = True
            return
        slots = ours.get("slots")
        if not (isinstance(slots, list) and all(isinstance(x, int) for x in slots)):
            return
        if (
            ours.get("fingerprint") != self.layout.fingerprint_hex()
            or ours.get("block_size") != self.block_size
        ):
            log.warning("KVBM: a handoff from another model or block size was ignored; recomputing")
            return
        expires = ours.get("expires")
        if not isinstance(expires, int | float) or expires < time.time():
            log.info("KVBM: a handoff arrived after it expired; recomputing the prompt")
            return
        if not self.readable_pools:
            log.warning(
                "KVBM: a decode request carries a handoff but DYN_KVBM_HANDOFF_DIR is unset"
            )
            return
        pool = ours.get("pool", "")
        if not isinstance(pool, str) or pool not in self.readable_pools:
            shown = repr(pool)[:80] if isinstance(pool, str) else type(pool).__name__
            log.warning(
                "KVBM: a handoff from pool %s, not one this worker reads (%s), was ignored; "
                "recomputing",
                shown,
                ", ".join(sorted(self.readable_pools)) or "none",
            )
            return
        st.receive, st.receive_pool = slots, pool

    def _keys(self, st: RequestState, blocks: int) -> list[int]:
        """Keys of the request's first `blocks` full blocks, extending the cached chain."""
        have = len(st.keys)
        if blocks > have:
            tokens = st.request.all_token_ids[: blocks * self.block_size]
            st.keys.extend(
                self.hasher.keys(tokens, st.extra, start=have, parent=st.keys[-1] if have else None)
            )
        return st.keys[:blocks]

    def _loadable_blocks(self, request: Any) -> int:
        # a synchronous load must leave at least one token for vLLM to compute
        return max(0, (request.num_tokens - 1) // self.block_size)

    # ---- vLLM scheduler hooks ------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        st = self._state(request)
        if st.skip:
            return 0, False
        start = num_computed_tokens // self.block_size
        st.lookup_start = start  # where vLLM's own hit ends; update_state_after_alloc needs it
        limit = self._loadable_blocks(request)
        if start >= limit:
            return 0, False
        keys = self._keys(st, limit)
        match = self.leader.match(keys[start:limit])
        handed = max(0, min(len(st.receive), limit) - start) if st.receive else 0
        st.use_handoff = handed > 0 and handed >= match.blocks
        if st.use_handoff:
            return handed * self.block_size, False
        st.decision = self.policy.decide(
            match.tiers, request.num_tokens - num_computed_tokens, self._queued_disk
        )
        return st.decision.load * self.block_size, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        if st.skip:
            return
        # request.num_computed_tokens is only set after this call: use the lookup's own start
        start = st.lookup_start
        limit = self._loadable_blocks(request)
        n = num_external_tokens // self.block_size
        keys = self._keys(st, limit)
        if not st.recorded:
            asked = max(0, limit - start)
            # hits are what the tiers held, loaded or skipped by the policy
            held = n
            if st.decision is not None and not st.use_handoff:
                held = max(n, st.decision.load + sum(st.decision.skipped.values()))
            self.leader.record_lookup(asked, self.leader.match(keys[start : start + held]))
            self._count_skipped(st)
            st.recorded = True
        if n <= 0:
            return
        device_blocks = blocks.get_block_ids()[0][start : start + n]
        if st.use_handoff:
            assert st.receive is not None
            loads = self.leader.plan_handoff_load(
                keys[start : start + n],
                device_blocks,
                st.receive[start : start + n],
                st.receive_pool,
            )
            self._plan.ops.loads.extend(loads)
            self.metrics.count(Count.MATCHED_TOKENS, len(loads) * self.block_size)
            st.stored = max(st.stored, start + n)
            return
        loads, offloads = self.leader.plan_load(keys[start : start + n], device_blocks)
        self._plan.ops.loads.extend(loads)
        self._queued_disk += sum(1 for op in loads if op.from_disk)
        st.loaded = st.loaded or bool(loads)
        if st.decision is not None and loads:
            self.metrics.count(Count.PREFILL_SECONDS_SAVED, st.decision.saved_seconds(len(loads)))
        self._plan.ops.offloads.extend(offloads)
        self._plan.unloadable.extend(device_blocks[len(loads) :])
        self.metrics.count(Count.MATCHED_TOKENS, len(loads) * self.block_size)
        # onboarded blocks are already held: write-through resumes after them
        st.stored = max(st.stored, start + n)

    def build_step(self, num_scheduled_tokens: dict[str, int], block_ids_of) -> StepPlan:
        """Plan the write-through of blocks that become full in this step."""
        plan, self._plan = self._plan, StepPlan()
        self._queued_disk = 0
        self.decode_cost.planned(
            self.clock(), num_scheduled_tokens.keys(), self._decode_only(num_scheduled_tokens)
        )
        finishing: list[tuple[int, float]] = []  # prefills this step completes: (tokens, start)
        for req_id, scheduled in num_scheduled_tokens.items():
            st = self._requests.get(req_id)
            if st is None or st.skip:
                continue
            req = st.request
            after = min(req.num_computed_tokens + scheduled, req.num_tokens)
            self._time_prefill(st, after, bool(plan.ops.loads), finishing)
            # vLLM rewinds a request whose load failed (to the failed block) and one it preempted:
            # what it computes again is stored again (`plan_store` only touches blocks still held;
            # the worker discarded the stores of the failed step, ops.discard_computed)
            st.stored = min(st.stored, req.num_computed_tokens // self.block_size)
            if st.handoff_slots is not None and req.num_computed_tokens < req.num_prompt_tokens:
                st.handoff_slots = None  # and a prompt computed again is handed off again
            if st.produce and st.handoff_slots is None and after >= req.num_prompt_tokens:
                self._plan_handoff(st, plan, block_ids_of(req_id))
            full = after // self.block_size
            if full <= st.stored:
                continue
            keys = self._keys(st, full)
            device_blocks = block_ids_of(req_id)[st.stored : full]
            if len(device_blocks) < full - st.stored:
                continue  # blocks not allocated yet (cannot happen for computed tokens)
            stores, offloads = self.leader.plan_store(keys[st.stored : full], device_blocks)
            plan.ops.stores.extend(stores)
            plan.ops.offloads.extend(offloads)
            st.stored = full
        self.leader.end_step()
        if finishing:
            plan.step = self._step
            self._timed[self._step] = finishing
            self._step += 1
            while len(self._timed) > MAX_TIMED_STEPS:
                del self._timed[next(iter(self._timed))]
        return plan

    def _decode_only(self, num_scheduled_tokens: dict[str, int]) -> bool:
        """Every request of the step is past its prompt (a step that computes no prompt)."""
        for req_id in num_scheduled_tokens:
            st = self._requests.get(req_id)
            if st is None or st.request.num_computed_tokens < st.request.num_prompt_tokens:
                return False
        return True

    def _time_prefill(
        self, st: RequestState, after: int, step_loads: bool, finishing: list[tuple[int, float]]
    ) -> None:
        """Start timing a prompt when its first chunk is scheduled; a step that completes it
        carries the sample until the worker reports the step done. A prefill that ran beside a
        KVBM load (its own or another request's) is no measure of recomputing, and is dropped."""
        req = st.request
        if req.num_computed_tokens >= req.num_prompt_tokens:
            return
        if st.prefill_t0 is None:
            st.prefill_t0, st.prefill_from = self.clock(), req.num_computed_tokens
        st.loaded = st.loaded or step_loads
        if after >= req.num_prompt_tokens:
            if not st.loaded:
                finishing.append((req.num_prompt_tokens - st.prefill_from, st.prefill_t0))
            st.prefill_t0, st.loaded = None, False

    def _count_skipped(self, st: RequestState) -> None:
        if st.decision is None or st.use_handoff:
            return
        for (tier, reason), n in st.decision.skipped.items():
            self.metrics.count(Count.ONBOARD_SKIPPED, n, tier=tier.value, reason=reason.value)

    def _plan_handoff(self, st: RequestState, plan: StepPlan, block_ids: list[int]) -> None:
        """The prompt is computed (in this step): all its full blocks go to the handoff pool,
        including those vLLM or KVBM supplied from a cache — the decode needs every one."""
        full = st.request.num_prompt_tokens // self.block_size
        keys = self._keys(st, full)
        ops, slots = self.leader.plan_handoff(keys, block_ids[:full])
        plan.ops.handoffs.extend(ops)
        st.handoff_slots = slots

    def on_preempted(self, req_id: str) -> None:
        """A preempted request comes back through a fresh lookup; its stored blocks stay stored."""
        st = self._requests.get(req_id)
        if st is not None:
            st.recorded = False
            st.prefill_t0, st.loaded = None, False

    def request_finished(self, req_id: str) -> dict | None:
        """Forget the request; a prefill request returns what its decode needs."""
        st = self._requests.pop(req_id, None)
        if st is None or not st.handoff_slots:
            return None
        return {
            "dynkv": {
                "fingerprint": self.layout.fingerprint_hex(),
                "block_size": self.block_size,
                "pool": self.handoff_pool,
                "slots": st.handoff_slots,
                "expires": time.time() + self.handoff_ttl,
            }
        }

    def apply_report(self, report: StoreReport) -> None:
        self.leader.apply_report(report)
        for tier, blocks, seconds in report.loads:
            if tier in (Tier.HOST, Tier.DISK):
                self.policy.load_done(tier, blocks, seconds)
        now = self.clock()
        for step, busy in report.steps:  # every rank acknowledges: the first one times it
            samples = self._timed.pop(step, None)
            if samples:  # prompts batched into one step share its time: one sample of them all
                # the connector's own saves are not part of recomputing (the blocks are stored)
                self.policy.prefill_done(
                    sum(n for n, _ in samples),
                    now - min(t0 for _, t0 in samples) - busy,
                    length=max(n for n, _ in samples),
                )

    def close(self) -> None:
        if self.g1_events is not None:
            self.g1_events.close()
        if self.events is not None:
            self.events.close()
        self.metrics.close()
