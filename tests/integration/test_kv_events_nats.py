"""KV events through a real nats-server: worker publisher → NATS → router index, including NATS
killed and restarted, lost batches (a gap) and a router joining late (snapshot request-reply)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynkv.infra.binaries import nats_server_binary
from dynkv.kvbm.event_publisher import KvEventPublisher, KvEventsSettings
from dynkv.kvbm.events import KvTier
from dynkv.kvbm.ops import Tier
from dynkv.ports import free_port
from dynkv.router.index import KvIndex
from dynkv.router.subscriber import KvEventSubscriber
from dynkv.router.sync import IndexSync

DEPLOYMENT = "it"


class Nats:
    """A nats-server on a fixed loopback port that can be killed and started again."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Nats]:
    server = Nats(tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.kill()


def publisher(url: str, worker: str = "agg-0", **kw) -> KvEventPublisher:
    settings = KvEventsSettings(
        nats_url=url,
        deployment=DEPLOYMENT,
        worker_id=worker,
        flush_ms=10,
        rates_interval_secs=0.3,
        reconnect_secs=0.1,
        **kw,
    )
    return KvEventPublisher(settings, block_size=16)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def keys_of(sync: IndexSync, worker: str, tier: KvTier, candidates) -> set[int]:
    return {k for k in candidates if sync.index.tiers_of(k).get(worker) == tier}


def router(url: str) -> tuple[IndexSync, KvEventSubscriber]:
    sync = IndexSync(KvIndex())
    return sync, KvEventSubscriber(url, DEPLOYMENT, sync, snapshot_timeout=1.0, retry_secs=0.1)


def test_events_reach_the_index_and_survive_nats_being_killed_and_restarted(nats_server):
    async def scenario() -> None:
        sync, sub = router(nats_server.url)
        await sub.start()
        pub = publisher(nats_server.url).start()
        try:
            for k in range(1, 11):
                pub.stored(Tier.HOST, k)
            pub.stored(Tier.DISK, 5)
            pub.removed(Tier.HOST, 10)
            await until(lambda: keys_of(sync, "agg-0", KvTier.HOST, range(20)) == set(range(1, 10)))
            assert sync.index.tiers_of(5) == {"agg-0": KvTier.HOST}  # best tier; G3 copy too
            assert sync.counters.snapshots_applied == 0  # batch 1 onwards: no snapshot needed
            await until(lambda: "agg-0" in sync.rates)
            assert sync.rates["agg-0"].held_blocks == {KvTier.HOST: 9, KvTier.DISK: 1}

            nats_server.kill()
            await until(lambda: not pub.connected.is_set() and not sub.connected)
            for k in range(20, 30):  # changes while NATS is down: dropped and counted
                pub.stored(Tier.HOST, k)
            pub.removed(Tier.HOST, 1)
            await until(lambda: pub.dropped_batches >= 1)

            nats_server.start()
            # the worker announces its batch number; the router notices the gap and resyncs
            want = set(range(2, 10)) | set(range(20, 30))
            await until(lambda: keys_of(sync, "agg-0", KvTier.HOST, range(40)) == want, timeout=20)
            assert sync.counters.snapshots_applied >= 1 and pub.snapshots_served >= 1
            pub.stored(Tier.HOST, 35)  # and live events flow again after the snapshot
            await until(lambda: sync.index.tiers_of(35) == {"agg-0": KvTier.HOST})
        finally:
            pub.close()
            await sub.close()

    asyncio.run(scenario())


def test_lost_batches_and_a_late_router_are_repaired_by_snapshots(nats_server):
    async def scenario() -> None:
        # a tiny queue, one event per batch: a burst overflows it and batches are lost
        pub = publisher(nats_server.url, batch_max=1, queue_max=1).start()
        try:
            await until(pub.connected.is_set)
            for k in range(100):  # before any router exists: it joins late
                pub.stored(Tier.HOST, k)
            sync, sub = router(nats_server.url)
            await sub.start()
            try:
                await until(lambda: sync.synced("agg-0"), timeout=20)
                for k in range(100, 400):  # a burst: the publisher drops batches
                    pub.stored(Tier.DISK, k)
                await until(lambda: pub.dropped_batches > 0)
                await until(
                    lambda: (
                        keys_of(sync, "agg-0", KvTier.DISK, range(500)) == set(range(100, 400))
                        and keys_of(sync, "agg-0", KvTier.HOST, range(500)) == set(range(100))
                    ),
                    timeout=20,
                )
                assert sync.counters.snapshots_applied >= 2 and sync.counters.gaps >= 1

                # the worker restarts: a new instance voids everything the old one said
                pub.close()
                pub2 = publisher(nats_server.url).start()
                try:
                    pub2.stored(Tier.HOST, 999)
                    await until(lambda: sync.index.tiers_of(999) == {"agg-0": KvTier.HOST})
                    assert sync.index.tiers_of(5) == {} and len(sync.index) == 1
                    assert sync.counters.new_instances == 1
                finally:
                    pub2.close()
            finally:
                await sub.close()
        finally:
            pub.close()

    asyncio.run(scenario())


def test_a_kvbm_engine_publishes_the_keys_the_router_computes_for_the_prompt(
    nats_server, monkeypatch, tmp_path
):
    """The scheduler half of the connector, as vLLM drives it, with the plan's environment: its
    stored blocks reach the router under the keys the router computes from the prompt's tokens
    (salt and fingerprint included), and the router sends the prompt there."""
    from kvbm_helpers import LAYOUT, Request, settings

    from dynkv.kvbm.keys import BlockHasher
    from dynkv.kvbm.vllm_scheduler import SchedulerSide
    from dynkv.router.decide import decide
    from dynkv.router.score import ScorerConfig, WorkerLoad

    env = KvEventsSettings.env(nats_url=nats_server.url, deployment=DEPLOYMENT, worker_id="agg-0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DYNKV_KV_EVENTS_FLUSH_MS", "10")

    async def scenario() -> None:
        sync, sub = router(nats_server.url)
        await sub.start()
        side = SchedulerSide(
            LAYOUT, settings(cpu_cache_override_num_blocks=32), serve_metrics=False
        )
        try:
            assert side.events is not None
            tokens = list(range(1000, 1000 + 10 * LAYOUT.block_size + 2))  # 10 full blocks
            req = Request("r1", tokens, cache_salt="tenant-a")
            side.get_num_new_matched_tokens(req, 0)
            side.build_step({"r1": len(tokens)}, lambda _rid: list(range(11)))
            hasher = BlockHasher(LAYOUT.fingerprint(), LAYOUT.block_size)
            keys = hasher.keys(tokens, ["salt:tenant-a"])
            assert len(keys) == 10
            await until(
                lambda: (
                    sync.index.match(keys).get("agg-0", None) is not None
                    and sync.index.match(keys)["agg-0"].host == 10
                )
            )
            await until(lambda: "agg-0" in sync.rates)  # it announces the root of its keys
            assert sync.rates["agg-0"].fingerprint == LAYOUT.fingerprint_hex()
            other = hasher.keys(tokens, ["salt:tenant-b"])  # another tenant shares nothing
            assert sync.index.match(other)["agg-0"].blocks == 0
            loads = {"agg-0": WorkerLoad(), "agg-1": WorkerLoad()}
            d = decide(
                sync.index, keys, len(tokens), LAYOUT.block_size, loads, sync.rates, ScorerConfig()
            )
            assert d.chosen.worker == "agg-0"
            assert d.chosen.cached_tokens == 10 * LAYOUT.block_size
        finally:
            side.close()
            await sub.close()

    asyncio.run(scenario())


def test_kv_router_picks_by_prefix_and_falls_back_to_load_while_nats_is_down(nats_server):
    """`KvRouter` as a frontend would use it: it hashes prompts with the fingerprint the worker
    announces, routes a cached prefix to its holder, and routes by load while NATS is down."""
    from dynkv.kvbm.keys import BlockHasher, extra_keys
    from dynkv.router.router import KvRouter, Prompt
    from dynkv.router.score import WorkerLoad

    fingerprint = "ab" * 16
    hasher = BlockHasher(bytes.fromhex(fingerprint), 16)
    tokens = list(range(500, 500 + 16 * 8 + 3))
    keys = hasher.keys(tokens, extra_keys("s1"))

    async def scenario() -> None:
        kv = KvRouter(nats_server.url, DEPLOYMENT, snapshot_timeout=1.0, retry_secs=0.1)
        await kv.start()
        settings = KvEventsSettings(
            nats_url=nats_server.url,
            deployment=DEPLOYMENT,
            worker_id="agg-1",
            flush_ms=10,
            rates_interval_secs=0.2,
            reconnect_secs=0.1,
        )
        pub = KvEventPublisher(settings, block_size=16, fingerprint=fingerprint).start()
        try:
            for k in keys:
                pub.stored(Tier.DISK, k)
            await until(lambda: "agg-1" in kv.sync.rates and len(kv.index) == len(keys))
            loads = {"agg-0": WorkerLoad(), "agg-1": WorkerLoad(outstanding_prefill_tokens=10)}
            d = kv.pick(Prompt(tokens, "s1"), loads)
            assert (d.chosen.worker, d.reason, d.chosen.cached_tokens) == ("agg-1", "kv", 128)
            assert d.chosen.match.disk == 8
            other = kv.pick(Prompt(tokens, "s2"), loads)  # another tenant: nothing cached
            assert (other.chosen.worker, other.reason) == ("agg-0", "kv_miss")

            nats_server.kill()
            await until(lambda: not kv.connected)
            d = kv.pick(Prompt(tokens, "s1"), loads)
            assert (d.chosen.worker, d.reason) == ("agg-0", "nats_down")  # least outstanding
            nats_server.start()
            await until(lambda: kv.connected and kv.sync.synced("agg-1"), timeout=20)
            # polled with estimate: a pick per poll would record the prompt as headed to the
            # worker it chose, and the next poll would find it there whatever the index held
            await until(lambda: kv.estimate(Prompt(tokens, "s1"), loads).reason == "kv")
            assert kv.stats()["decisions"]["nats_down"] == 1
        finally:
            pub.close()
            await kv.close()

    asyncio.run(scenario())
