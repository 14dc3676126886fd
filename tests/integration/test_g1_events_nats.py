"""G1 events through a real nats-server: vLLM's KV events (a real ZMQ PUB socket on a private
ipc:// path, vLLM 0.32's wire format) → the bridge → the worker's event stream → the router's
index, for a worker without KVBM (the wrapper's bridge) and with it (the connector's bridge,
sharing one stream and one snapshot with G2/G3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from test_kv_events_nats import DEPLOYMENT, Nats, keys_of, router, until
from vllm_events_support import AllBlocksCleared, BlockRemoved, VllmPublisher, stored
from zmq.utils.monitor import recv_monitor_message

from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.kvbm.events import KvTier
from dynkv.kvbm.g1_events import g1_fingerprint
from dynkv.kvbm.keys import BlockHasher, extra_keys
from dynkv.router.router import KvRouter, Prompt
from dynkv.router.score import WorkerLoad
from dynkv.worker.g1_events import start_g1_events

pytestmark = pytest.mark.integration
BS = 16


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Nats]:
    server = Nats(tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.kill()


def private_endpoint(tmp_path: Path) -> str:
    run = tmp_path / "run" / "agg-0"
    run.mkdir(parents=True, mode=0o700)
    return f"ipc://{run / 'kv-events.sock'}"


def wait_subscriber(pub: VllmPublisher, timeout: float = 10.0) -> None:
    """ZMQ drops what a PUB sends before its subscriber's handshake (vLLM's engine sends
    nothing before its first request, long after the bridge connected)."""
    monitor = pub.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        if not monitor.poll(int(timeout * 1000)):
            raise AssertionError("the bridge did not connect")
        recv_monitor_message(monitor)
        time.sleep(0.2)  # its subscription follows the handshake
    finally:
        pub.sock.disable_monitor()
        monitor.close(0)


def settings(url: str, endpoint: str, worker: str = "agg-0") -> KvEventsSettings:
    return KvEventsSettings(
        nats_url=url,
        deployment=DEPLOYMENT,
        worker_id=worker,
        g1_endpoint=endpoint,
        flush_ms=10,
        rates_interval_secs=0.3,
        reconnect_secs=0.1,
    )


def hashes(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode().ljust(32, b"\0") for i in range(n)]


def test_a_worker_without_kvbm_is_routed_to_by_its_g1_blocks(nats_server, tmp_path):
    endpoint = private_endpoint(tmp_path)
    fingerprint = g1_fingerprint("tiny", BS)
    hasher = BlockHasher(fingerprint, BS)
    prompt = list(range(1000, 1000 + 8 * BS + 3))
    keys = hasher.keys(prompt, extra_keys("s1"))
    h = hashes("p", 8)

    async def scenario() -> None:
        kv = KvRouter(nats_server.url, DEPLOYMENT, snapshot_timeout=1.0, retry_secs=0.1)
        await kv.start()
        g1 = start_g1_events("tiny", BS, settings(nats_server.url, endpoint))
        assert g1 is not None
        vllm = VllmPublisher(endpoint)
        try:
            await asyncio.to_thread(wait_subscriber, vllm)
            # one step stores the prompt's first 5 blocks, the next 3 more under the 5th
            vllm.publish([stored(h[:5], None, prompt[: 5 * BS], BS, salt="s1")])
            vllm.publish([stored(h[5:], h[4], prompt[5 * BS : 8 * BS], BS)])
            vllm.publish([BlockRemoved(block_hashes=[h[7]], medium="GPU", group_idx=0)])
            await until(lambda: keys_of(kv.sync, "agg-0", KvTier.DEVICE, keys) == set(keys[:7]))
            await until(lambda: "agg-0" in kv.sync.rates)
            rates = kv.sync.rates["agg-0"]
            assert rates.fingerprint == fingerprint.hex() and rates.block_size == BS
            await until(lambda: kv.sync.rates["agg-0"].held_blocks.get(KvTier.DEVICE) == 7)

            loads = {"agg-0": WorkerLoad(outstanding_prefill_tokens=50), "agg-1": WorkerLoad()}
            d = kv.pick(Prompt(prompt, "s1"), loads)
            assert (d.chosen.worker, d.reason, d.chosen.match.device) == ("agg-0", "kv", 7)
            assert kv.pick(Prompt(prompt, "s2"), loads).reason == "kv_miss"  # other tenant

            # a router that joins late gets the G1 keys from the worker's snapshot
            late, sub = router(nats_server.url)
            await sub.start()
            try:
                await until(lambda: late.synced("agg-0"))
                assert keys_of(late, "agg-0", KvTier.DEVICE, keys) == set(keys[:7])
                assert late.counters.snapshots_applied == 1
            finally:
                await sub.close()

            # vLLM batches the bridge never saw: it reports G1 cleared rather than keep guesses
            vllm.publish([stored(hashes("q", 1), None, list(range(BS)), BS)], skip=2)
            await until(lambda: keys_of(kv.sync, "agg-0", KvTier.DEVICE, keys) == set())
            assert g1.bridge.gaps == 1
            other = hasher.keys(list(range(BS)))
            await until(lambda: kv.index.tiers_of(other[0]) == {"agg-0": KvTier.DEVICE})
            vllm.publish([AllBlocksCleared()])  # vLLM's prefix cache reset
            await until(lambda: len(kv.index) == 0)
        finally:
            vllm.close()
            g1.close()
            await kv.close()

    asyncio.run(scenario())


def test_kvbm_g1_and_g2_changes_share_one_stream_and_one_snapshot(
    nats_server, monkeypatch, tmp_path
):
    """The connector's scheduler half with the plan's environment: its bridge keys vLLM's blocks
    with the layout's fingerprint, so one prefix has one key in G1 and G2 and the router sees the
    best tier of each block."""
    from kvbm_helpers import LAYOUT, Request
    from kvbm_helpers import settings as kvbm_settings

    from dynkv.kvbm.vllm_scheduler import SchedulerSide

    endpoint = private_endpoint(tmp_path)
    env = KvEventsSettings.env(
        nats_url=nats_server.url, deployment=DEPLOYMENT, worker_id="agg-0", g1_endpoint=endpoint
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DYNKV_KV_EVENTS_FLUSH_MS", "10")
    monkeypatch.setenv("DYNKV_KV_EVENTS_RATES_INTERVAL_SECS", "0.3")  # a late router's cue
    bs = LAYOUT.block_size
    prompt = list(range(2000, 2000 + 6 * bs + 1))
    keys = BlockHasher(LAYOUT.fingerprint(), bs).keys(prompt, ["salt:t"])
    h = hashes("k", 6)

    async def scenario() -> None:
        sync, sub = router(nats_server.url)
        await sub.start()
        side = SchedulerSide(
            LAYOUT, kvbm_settings(cpu_cache_override_num_blocks=32), serve_metrics=False
        )
        vllm = VllmPublisher(endpoint)
        try:
            assert side.events is not None and side.g1_events is not None
            await asyncio.to_thread(wait_subscriber, vllm)
            vllm.publish([stored(h[:4], None, prompt[: 4 * bs], bs, salt="t")])  # G1: 4 blocks
            req = Request("r1", prompt, cache_salt="t")
            side.get_num_new_matched_tokens(req, 0)
            side.build_step({"r1": len(prompt)}, lambda _rid: list(range(7)))  # G2: all 6
            await until(
                lambda: (
                    keys_of(sync, "agg-0", KvTier.DEVICE, keys) == set(keys[:4])
                    and keys_of(sync, "agg-0", KvTier.HOST, keys) == set(keys[4:])
                )
            )
            match = sync.index.match(keys)["agg-0"]
            assert (match.device, match.host) == (4, 2)
            # evicted from the device, the G2 copy remains
            vllm.publish([BlockRemoved(block_hashes=h[2:4], medium="GPU", group_idx=0)])
            await until(lambda: keys_of(sync, "agg-0", KvTier.HOST, keys) == set(keys[2:]))

            late, late_sub = router(nats_server.url)
            await late_sub.start()
            try:
                await until(lambda: late.synced("agg-0"))
                assert late.index.match(keys)["agg-0"] == sync.index.match(keys)["agg-0"]
            finally:
                await late_sub.close()
            # one instance, one sequence: nothing was lost, no resync was needed
            assert sync.counters.gaps == 0 and sync.counters.snapshots_applied == 0
        finally:
            vllm.close()
            side.close()
            await sub.close()

    asyncio.run(scenario())
