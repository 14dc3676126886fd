"""Several prefill workers, several decode workers: one handoff pool per prefill worker.

The two halves of the real connector run here without vLLM — the scheduler half
(`SchedulerSide`: lookups, the step's plan, the `kv_transfer_params` a prefill returns) and the
worker half (`WorkerSide`: the store next to real KV tensors) — stepped in vLLM 0.32's hook
order, with real pools in /dev/shm laid out as `dynkv up` lays them out (docs/disagg.md): the
area `/dev/shm/dynkv-<name>`, a pool directory per prefill worker. The params travel as JSON,
as the frontend relays them. Asserted: every decode worker reads every prefill worker's pool,
byte-exact; a pool id that is not one of the deployment's prefill workers is refused (the
prompt is recomputed, nothing is opened); blocks read from the wrong pool fail verification
(recomputed, never wrong KV); a decode worker only reads the pools, and attaches them late.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from kvbm_helpers import G1, LAYOUT, NUM_BLOCKS, Blocks, Request, settings

from dynkv.kvbm.counters import Count
from dynkv.kvbm.handoff import POOL_FILE
from dynkv.kvbm.vllm_scheduler import SchedulerSide
from dynkv.kvbm.vllm_worker import WorkerSide

BS = LAYOUT.block_size
PROMPT_BLOCKS = 5
PREFILLS = ("prefill-0", "prefill-1")


class Engine:
    """One worker: both connector halves over one real G1, stepped one request at a time."""

    def __init__(self, **kw) -> None:
        s = settings(**kw)
        self.g1 = G1()
        self.sched = SchedulerSide(LAYOUT, s, serve_metrics=False)
        self.worker = WorkerSide(LAYOUT, s, num_blocks=NUM_BLOCKS)
        self.worker.register_kv_caches(self.g1.kv)
        self.n = 0

    def step(self, tokens: list[int], params: dict | None, first_block: int) -> tuple:
        """Serve one prompt (prefilled in one step) into device blocks first_block…; returns
        (tokens the connector supplied, device blocks that failed to load, the answer's
        kv_transfer_params as JSON would carry them)."""
        self.n += 1
        req = Request(f"r{self.n}", tokens, kv_transfer_params=params)
        ids = list(range(first_block, first_block + PROMPT_BLOCKS + 1))
        external, _ = self.sched.get_num_new_matched_tokens(req, 0)
        self.sched.update_state_after_alloc(req, Blocks(ids), external)
        req.num_computed_tokens = external
        plan = self.sched.build_step({req.request_id: len(tokens) - external}, lambda _r: ids)
        self.worker.start_load(plan.ops, plan.unloadable)
        failed = sorted(self.worker.take_load_errors())
        self.worker.save(plan.ops)  # after the forward: write-through and the handoff copy
        self.sched.apply_report(self.worker.take_report() or _empty())
        answer = self.sched.request_finished(req.request_id)
        return external, failed, json.loads(json.dumps(answer)) if answer else None

    def count(self, counter: Count) -> float:
        return self.sched.metrics.value(counter)

    def close(self) -> None:
        self.worker.close()
        self.sched.close()


def _empty():
    from dynkv.kvbm.ops import StoreReport

    return StoreReport()


def prompt(seed: int) -> list[int]:
    return [seed * 1000 + i for i in range(PROMPT_BLOCKS * BS + 1)]


@pytest.fixture
def area():
    top = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-pools-"))
    yield top / "area"  # what the plan names /dev/shm/dynkv-<deployment>
    shutil.rmtree(top)


@pytest.fixture
def fleet(area):
    engines: list[Engine] = []

    def make(**kw) -> Engine:
        engines.append(Engine(handoff_dir=area, **kw))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def prefill(engine: Engine, seed: int) -> tuple[dict, list[bytes]]:
    """Prefill `prompt(seed)` on `engine` with distinct KV bytes; returns the handoff and the
    bytes of the prompt's full blocks, as computed."""
    for block in range(PROMPT_BLOCKS):
        engine.g1.put(block, seed * 100 + block)  # "computed" KV, distinct per prompt
    external, _, answer = engine.step(prompt(seed), {"dynkv": {"produce": True}}, 0)
    assert external == 0 and answer is not None
    return answer, [engine.g1.get(b) for b in range(PROMPT_BLOCKS)]


def test_every_decode_worker_reads_every_prefill_workers_pool(area, fleet):
    prefills = [fleet(handoff_pool=p, cpu_cache_gb=0.001) for p in PREFILLS]
    decodes = [fleet(handoff_pools=",".join(PREFILLS)) for _ in range(2)]
    for d in decodes:  # readers create nothing, not even the pools they will read
        assert d.worker.store.handoff is None
    seed = 0
    for i, p in enumerate(prefills):
        for d in decodes:
            seed += 1
            handoff, computed = prefill(p, seed)
            assert handoff["dynkv"]["pool"] == PREFILLS[i]
            external, failed, _ = d.step(prompt(seed), handoff, 20)
            assert external == PROMPT_BLOCKS * BS and failed == []
            assert [d.g1.get(20 + b) for b in range(PROMPT_BLOCKS)] == computed
    for p in prefills:
        assert p.count(Count.HANDOFF_SENT) == 2 * PROMPT_BLOCKS
    for d in decodes:
        assert d.count(Count.HANDOFF_RECEIVED) == 2 * PROMPT_BLOCKS
        assert d.count(Count.HANDOFF_MISSED) == 0
        pools = d.worker.store.handoff_pools
        assert set(pools) == set(PREFILLS) and not any(x.writable for x in pools.values())
    # one pool per prefill worker, disjoint, private, in the deployment's area
    assert sorted(os.listdir(area)) == list(PREFILLS)
    assert stat.S_IMODE(area.stat().st_mode) == 0o700
    for name in PREFILLS:
        assert stat.S_IMODE((area / name).stat().st_mode) == 0o700
        assert stat.S_IMODE((area / name / POOL_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "forged", ["../prefill-0", "prefill-0/..", "/dev/shm", "..", "prefill-2", "", None, 0]
)
def test_a_pool_that_is_not_the_deployments_is_refused(area, fleet, forged):
    p0 = fleet(handoff_pool="prefill-0")
    decode = fleet(handoff_pools=",".join(PREFILLS))
    handoff, _ = prefill(p0, 1)
    handoff["dynkv"]["pool"] = forged
    external, failed, _ = decode.step(prompt(1), handoff, 20)
    assert external == 0 and failed == []  # nothing onboarded: the prompt is computed
    assert decode.worker.store.handoff_pools == {}  # and no pool was even opened
    assert sorted(os.listdir(area)) == ["prefill-0"]


def test_slots_read_from_another_pool_fail_verification(area, fleet):
    """A handoff whose pool id was switched to the other prefill worker's: the slots there hold
    other blocks (or none), so every block fails its key/checksum check and is recomputed."""
    p0, p1 = (fleet(handoff_pool=p) for p in PREFILLS)
    decode = fleet(handoff_pools=",".join(PREFILLS))
    prefill(p1, 2)  # p1's pool holds another prompt at the same slot numbers
    handoff, _ = prefill(p0, 1)
    handoff["dynkv"]["pool"] = "prefill-1"
    external, failed, _ = decode.step(prompt(1), handoff, 20)
    assert external == PROMPT_BLOCKS * BS
    assert failed == list(range(20, 20 + PROMPT_BLOCKS))  # vLLM recomputes them all
    assert decode.count(Count.HANDOFF_MISSED) == PROMPT_BLOCKS
    assert decode.count(Count.HANDOFF_RECEIVED) == 0


def test_a_pool_not_there_yet_is_a_miss_then_read_once_it_is(area, fleet, caplog):
    decode = fleet(handoff_pools=",".join(PREFILLS))
    p0 = fleet(handoff_pool="prefill-0")
    handoff, _ = prefill(p0, 1)
    handoff["dynkv"]["pool"] = "prefill-1"  # a configured pool whose worker has not started
    external, failed, _ = decode.step(prompt(1), handoff, 20)
    assert failed == list(range(20, 20 + PROMPT_BLOCKS))
    assert "cannot read handoff pool prefill-1" in caplog.text
    p1 = fleet(handoff_pool="prefill-1")  # it starts: its pool appears, the decode reads it
    handoff, computed = prefill(p1, 3)
    external, failed, _ = decode.step(prompt(3), handoff, 40)
    assert failed == [] and [decode.g1.get(40 + b) for b in range(PROMPT_BLOCKS)] == computed
