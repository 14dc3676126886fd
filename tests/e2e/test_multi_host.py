"""Two hosts on one box with the real vLLM (docs/multi-host.md): host A runs `up -d --advertise
127.0.0.1 --workers 0` (etcd, NATS, the enroller and the frontend, no engine), host B (its own
state dir) `join TOKEN --advertise 127.0.0.2 -d` with one worker of the tiny model. A's frontend
serves a completion from B's worker over https; B's KV events arrive on A's NATS (TLS + token);
a client without the certificate cannot read A's etcd nor one without the token publish on its
NATS; wrong and expired tokens are refused; A's `down` makes B's worker leave. One vLLM engine
in all. The CLI-level details (tampered and replayed tokens, B's own `down`, `status` by host)
are tests/integration/test_join.py's, with the fake vLLM."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from stack_support import assert_nothing_left, dynkv, stack_env

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.kvbm.events import events_subject, events_wildcard
from dynkv.supervisor import read_state
from dynkv.tls.layout import nats_token
from dynkv.tls.model import ClientTLS

pytestmark = pytest.mark.e2e
NAME = "mh2e"
NODE = "hostb"
WORKER_ID = f"{NODE}-agg-0"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, e2e_cache):
    tmp = tmp_path_factory.mktemp("multi-host-e2e")
    common = {"DYNKV_LEASE_TTL_SECS": "4"}
    a = stack_env(
        tmp / "a", NAME, cache=e2e_cache, workers=1, DYNKV_ADVERTISE="127.0.0.1", **common
    )
    a["DYNKV_WORKERS"] = "0"
    b = stack_env(
        tmp / "b",
        NAME,
        cache=e2e_cache,
        workers=1,
        DYNKV_PROFILE="gpu-cpu",
        DYN_KVBM_CPU_CACHE_GB="0.05",
        DYNKV_DEVICE_KV_GB="0.02",
        DYNKV_STARTUP_TIMEOUT_SECS="600",
        **common,
    )
    ddir_a = Path(a["DYNKV_STATE_DIR"]) / NAME
    ddir_b = Path(b["DYNKV_STATE_DIR"]) / NAME
    try:
        started = time.monotonic()
        # no engine on A: its doctor has nothing the other e2e stacks do not check
        up = dynkv("up", "-d", "--skip-checks", env=a, timeout=300)
        assert up.returncode == 0, up.stderr[-4000:]
        print(f"\nA: up -d --workers 0 --advertise: {time.monotonic() - started:.1f} s")
        made = dynkv("join-token", "--ttl", "1h", env=a)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        started = time.monotonic()
        joined = dynkv(
            "join", token, "--advertise", "127.0.0.2", "--node", NODE, "-d", env=b, timeout=900
        )
        assert joined.returncode == 0, joined.stderr[-4000:]
        print(f"B: join -d until serving (registered, healthy): {time.monotonic() - started:.1f} s")
        yield a, b, ddir_a, ddir_b
    finally:
        dynkv("down", env=b, timeout=180)
        dynkv("down", env=a, timeout=180)


def ca_of(ddir_a: Path) -> str:
    return str(ddir_a / "tls" / "ca.crt")


def completion(a: dict, ddir_a: Path, prompt: str) -> httpx.Response:
    url = f"https://127.0.0.1:{a['DYNKV_FRONTEND_PORT']}/v1/completions"
    body = {"model": "dynkv-tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    return httpx.post(url, json=body, verify=ClientTLS(ca=ca_of(ddir_a)).ssl_context(), timeout=120)


def test_first_hosts_frontend_serves_from_the_joined_worker_over_tls(hosts):
    a, _, ddir_a, _ = hosts
    resp = completion(a, ddir_a, "The capital of France is")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-dynkv-worker"] == WORKER_ID
    assert resp.json()["choices"][0]["text"]


def test_joined_workers_kv_events_arrive_on_the_first_hosts_nats(hosts):
    a, _, ddir_a, _ = hosts
    secret = (ddir_a / "deployment.secret").read_text().strip()

    async def run() -> list[dict]:
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        ctx = ClientTLS(ca=ca_of(ddir_a)).ssl_context()
        nc = await nats.connect(
            f"tls://127.0.0.1:{a['DYNKV_NATS_PORT']}", tls=ctx, token=nats_token(secret)
        )
        sub = await nc.subscribe(events_wildcard(NAME))
        await asyncio.to_thread(completion, a, ddir_a, "x " * 200)  # new blocks: stored events
        got: list[dict] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=2)
            except NatsTimeout:
                continue
            if msg.subject == events_subject(NAME, WORKER_ID):
                data = json.loads(msg.data)
                got.append(data)
                if "events" in data:
                    break
        await nc.close()
        return got

    got = asyncio.run(run())
    assert any("events" in m for m in got), got


def test_without_the_certificate_or_the_token_no_entry(hosts):
    a, _, ddir_a, _ = hosts
    etcd = f"https://127.0.0.1:{a['DYNKV_ETCD_PORT']}"
    client = EtcdClient(etcd, tls=ClientTLS(ca=ca_of(ddir_a)), timeout=3)
    with client, pytest.raises(EtcdError):
        client.get_prefix(f"/dynkv/{NAME}/workers/")

    async def publish_without_token() -> None:
        import nats

        ctx = ClientTLS(ca=ca_of(ddir_a)).ssl_context()
        await nats.connect(
            f"tls://127.0.0.1:{a['DYNKV_NATS_PORT']}",
            tls=ctx,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
        )

    with pytest.raises(Exception):  # noqa: B017 (nats-py raises its own authorization error)
        asyncio.run(publish_without_token())


def test_wrong_and_expired_tokens_are_refused(hosts):
    a, b, _, ddir_b = hosts
    wrong = dynkv("join", "dynkv1.AAAA.BBBB", "--advertise", "127.0.0.2", env=b)
    assert wrong.returncode == 2 and "damaged" in wrong.stderr, wrong.stderr
    short = dynkv("join-token", "--ttl", "1s", env=a).stdout.strip()
    time.sleep(1.5)
    expired = dynkv("join", short, "--advertise", "127.0.0.2", env=b)
    assert expired.returncode == 2 and "expired" in expired.stderr, expired.stderr
    assert read_state(ddir_b) is not None  # the joined node kept running


def test_zz_first_hosts_down_makes_the_joined_worker_leave(hosts):
    a, _, ddir_a, ddir_b = hosts
    services_b = read_state(ddir_b).services
    started = time.monotonic()
    down = dynkv("down", env=a, timeout=180)
    assert down.returncode == 0, down.stderr
    assert "did not leave" not in down.stderr, down.stderr
    deadline = time.monotonic() + 60
    while read_state(ddir_b) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert read_state(ddir_b) is None
    print(f"\nA's down until B's worker left: {time.monotonic() - started:.1f} s")
    assert_nothing_left(services_b, ddir_b)
