"""The frontend's `kv` policy end to end except vLLM: a real nats-server, a worker's KV event
publisher announcing a prompt's blocks, the real frontend (tokenizing with the tiny model's own
tokenizer) in front of two fake workers over loopback. A repeated prefix goes to the worker
whose events announced it; `x-dynkv-router` chooses the policy per request; a worker that leaves
etcd leaves the index; NATS down routes by load, counted (docs/frontend.md#routing)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from frontend_support import FakeWorker, ServerThread, pool_of, registration
from prometheus_client.parser import text_string_to_metric_families

from dynkv.frontend import create_app
from dynkv.frontend.config import FrontendConfig
from dynkv.frontend.prompt_ids import PromptTokenizer
from dynkv.infra.binaries import nats_server_binary
from dynkv.kvbm.event_publisher import KvEventPublisher, KvEventsSettings
from dynkv.kvbm.keys import BlockHasher, extra_keys
from dynkv.kvbm.ops import Tier
from dynkv.model import ensure_model
from dynkv.ports import free_port

DEPLOYMENT = "kvfe"
FINGERPRINT = "ab" * 16
BLOCK = 32
PROMPT = "the river of the mountain holds the cache of every block " * 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_model("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture
def nats(tmp_path: Path):
    port = free_port()
    argv = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        argv, stdout=(tmp_path / "nats.log").open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield proc, f"nats://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)


def metric(fe: ServerThread, name: str, **labels: str) -> float:
    text = httpx.get(fe.url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def send(fe: ServerThread, router: str | None = None, salt: str | None = None) -> str:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 2}
    if salt:
        body["cache_salt"] = salt
    headers = {"x-dynkv-router": router} if router else {}
    r = httpx.post(fe.url + "/v1/completions", json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-dynkv-worker"]


def publisher(url: str, worker: str) -> KvEventPublisher:
    """`worker`'s KV event publisher, as its KVBM would run it (fast flushes and rates)."""
    settings = KvEventsSettings(
        nats_url=url,
        deployment=DEPLOYMENT,
        worker_id=worker,
        flush_ms=10,
        rates_interval_secs=0.2,
        reconnect_secs=0.1,
    )
    return KvEventPublisher(settings, block_size=BLOCK, fingerprint=FINGERPRINT).start()


def announce(pub: KvEventPublisher, fe: ServerThread, keys: list[int]) -> None:
    """`keys` stored in G2, in the frontend's index, and the worker's fingerprint known."""
    for key in keys:
        pub.stored(Tier.HOST, key)
    until(lambda: metric(fe, "dynkv_router_index_blocks") == len(keys))
    time.sleep(0.5)  # a rates message: the router learns the worker's fingerprint


def test_a_prefix_goes_where_its_blocks_were_announced(tiny, nats):
    proc, url = nats
    ids = PromptTokenizer(str(tiny)).token_ids("completions", {"prompt": PROMPT})
    keys = BlockHasher(bytes.fromhex(FINGERPRINT), BLOCK).keys(ids)
    assert len(keys) >= 3
    pub = publisher(url, "agg-1")
    fakes = [FakeWorker("w0"), FakeWorker("w1")]
    try:
        with ServerThread(fakes[0].app()) as s0, ServerThread(fakes[1].app()) as s1:
            pool = pool_of(("agg-0", s0.url), ("agg-1", s1.url))
            config = FrontendConfig(
                deployment=DEPLOYMENT, nats_url=url, tokenizer=str(tiny), router="round_robin"
            )
            app = create_app(config, pool=pool, discover=False)
            with ServerThread(app) as fe:
                announce(pub, fe, keys)

                # the default policy stays round robin; the header asks for kv per request
                assert {send(fe), send(fe)} == {"agg-0", "agg-1"}
                assert [send(fe, "kv") for _ in range(6)] == ["agg-1"] * 6
                assert metric(fe, "dynkv_router_decisions_total", policy="kv", reason="kv") == 6
                assert metric(fe, "dynkv_router_routed_total", policy="kv", worker="agg-1") == 6
                assert metric(fe, "dynkv_router_decision_seconds_count", policy="kv") == 6
                assert metric(fe, "dynkv_router_index_bytes") > 0
                # another salt is another key space: nothing cached anywhere
                send(fe, "kv", salt="tenant-b")
                assert metric(fe, "dynkv_router_decisions_total", reason="kv_miss") == 1
                # a salted prefix is found under its own salt only
                salted = BlockHasher(bytes.fromhex(FINGERPRINT), BLOCK).keys(
                    ids, extra_keys("tenant-a")
                )
                for key in salted:
                    pub.stored(Tier.HOST, key)
                until(lambda: metric(fe, "dynkv_router_index_blocks") == 2 * len(keys))
                assert send(fe, "kv", salt="tenant-a") == "agg-1"

                # agg-1 leaves etcd (and stops publishing): its blocks leave the index
                pub.close()
                pool.remove("/dynkv/t/workers/agg-1")
                assert metric(fe, "dynkv_router_index_blocks") == 0
                assert send(fe, "kv") == "agg-0"

                # NATS down: routed by load, counted; never failed
                proc.send_signal(signal.SIGKILL)
                proc.wait(5)
                time.sleep(0.5)
                assert send(fe, "kv") == "agg-0"
                until(lambda: metric(fe, "dynkv_router_nats_fallbacks_total") >= 1)
                assert metric(fe, "dynkv_router_decisions_total", reason="nats_down") >= 1
    finally:
        pub.close()


def test_disagg_kv_places_the_prefill_and_measures_its_accuracy_there(tiny, nats):
    """Disaggregated: kv chooses the prefill worker by its announced blocks, and the prefill
    answer's cached tokens are what the prediction is compared with (the decode worker's answer
    reports the handed-off prompt, not a reuse)."""
    _, url = nats
    ids = PromptTokenizer(str(tiny)).token_ids("completions", {"prompt": PROMPT})
    keys = BlockHasher(bytes.fromhex(FINGERPRINT), BLOCK).keys(ids)
    pub = publisher(url, "prefill-1")
    handoff = {"dynkv": {"fingerprint": "ab", "block_size": BLOCK, "slots": [1], "expires": 9e9}}
    held = min(len(keys), (len(ids) - 1) // BLOCK) * BLOCK  # the last token is always computed
    fakes = [
        FakeWorker("p0", transfer_params=handoff, cached_tokens=0),
        FakeWorker("p1", transfer_params=handoff, cached_tokens=held),
        FakeWorker("d0", cached_tokens=len(ids)),
    ]
    try:
        with (
            ServerThread(fakes[0].app()) as s0,
            ServerThread(fakes[1].app()) as s1,
            ServerThread(fakes[2].app()) as s2,
        ):
            pool = pool_of(("prefill-0", s0.url), ("prefill-1", s1.url), role="prefill")
            pool.put("/dynkv/t/workers/decode-0", registration("decode-0", s2.url, role="decode"))
            config = FrontendConfig(
                deployment=DEPLOYMENT, nats_url=url, tokenizer=str(tiny), router="kv"
            )
            app = create_app(config, pool=pool, discover=False)
            with ServerThread(app) as fe:
                announce(pub, fe, keys)
                assert send(fe) == "decode-0"
                assert len(fakes[1].bodies) == 1 and not fakes[0].bodies
                predicted = metric(fe, "dynkv_router_predicted_cached_tokens_total")
                actual = metric(fe, "dynkv_router_actual_cached_tokens_total")
                assert predicted == actual == held
                assert metric(fe, "dynkv_router_actual_cached_tokens_total", worker="prefill-1")
    finally:
        pub.close()
