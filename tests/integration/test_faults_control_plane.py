"""kill -9 of each service of a running deployment while clients stream through the frontend.

A real `dynkv up -d` (etcd, NATS, the worker wrapper, the frontend) with the fake vLLM behind the
wrapper: the control plane is what is under test, and a fake stack starts in seconds. Four
clients stream completions back to back (20 chunks, 30 ms apart: a request lasts ~0.6 s, so some
are always in flight when a service dies). Each test writes down the expected behaviour in its
docstring — what clients see, how long at most, what recovers and how, what `dynkv status --json`
says — and asserts it. The stack runs without restarts (`DYNKV_RESTART_LIMIT=0`): what clients
see while a service is down (the "Failure behaviour" table of docs/operations.md); restarts are
tests/integration/test_restart.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fault_support import Load
from infra_helpers import assert_nothing_left, use_fake_vllm
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.supervisor import read_state
from dynkv.worker.record import signed, worker_api_key

pytestmark = pytest.mark.integration
runner = CliRunner()
TTL = 2  # DYNKV_LEASE_TTL_SECS: the smallest allowed
BOUND = 5.0  # no request may take longer than this, fault or not (a healthy one takes ~0.6 s)
BODY = {"model": "model", "prompt": "hi", "stream": True, "max_tokens": 20}


class Stack:
    def __init__(self, env: dict[str, str], ddir: str) -> None:
        self.env, self.ddir = env, ddir
        self.url = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
        self.etcd = f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}"
        self.state = read_state(ddir)

    def pids(self) -> list[tuple[int, float]]:
        return [(s.pid, s.create_time) for s in self.state.services]

    def kill(self, service: str) -> float:
        """SIGKILL the service's whole process group; returns when it happened (monotonic)."""
        os.killpg(self.state.service(service).pgid, signal.SIGKILL)
        return time.monotonic()

    def load(self, clients: int = 4) -> Load:
        return Load(f"{self.url}/v1/completions", BODY, clients=clients, timeout=BOUND * 2)

    def status(self) -> tuple[int, dict]:
        result = runner.invoke(app, ["status", "--json"])
        return result.exit_code, json.loads(result.stdout)

    def service_status(self, name: str) -> dict:
        return next(s for s in self.status()[1]["services"] if s["name"] == name)

    def registered(self) -> int:
        with EtcdClient(self.etcd, timeout=2) as etcd:
            return len(etcd.get_prefix("/dynkv/faults/workers/").kvs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=2).json()

    @property
    def secret(self) -> str:
        """The deployment secret `up` created (signs registrations, keys the workers)."""
        return Path(self.ddir, "deployment.secret").read_text().strip()


def up() -> None:
    result = runner.invoke(app, ["up", "-d", "--skip-checks", "--model", os.environ["FAKE_MODEL"]])
    assert result.exit_code == 0, result.output


@pytest.fixture
def stack(tmp_path, monkeypatch):
    env, model = use_fake_vllm(
        monkeypatch,
        tmp_path,
        "faults",
        DYNKV_LEASE_TTL_SECS=str(TTL),
        DYNKV_RESTART_LIMIT="0",  # what clients see while a service is down; restarts: test_restart.py
        FAKE_VLLM_TOKENS="20",
        FAKE_VLLM_TOKEN_DELAY="0.03",
    )
    monkeypatch.setenv("FAKE_MODEL", str(model))
    up()
    ddir = os.path.join(env["DYNKV_STATE_DIR"], "faults")
    s = Stack(env, ddir)
    yield s
    runner.invoke(app, ["down", "--timeout", "3"])
    assert_nothing_left(s.pids(), ddir)


def longest(outcomes) -> float:
    return max((o.seconds for o in outcomes), default=0.0)


def test_worker_killed_during_load(stack):
    """Expected: requests in flight when the worker dies end at once — a stream that had started
    gets a final SSE `error` event (`stream_broken`), one that had not is answered 503
    `no_worker_available` (the one retry finds no other worker); every later request is a 503
    at once, since the connection failure took the worker out of rotation. Nothing hangs: every
    request ends within BOUND. The registration leaves etcd within the lease TTL (+1 s).
    `dynkv status --json` exits 1 and shows the worker `running: false` (etcd, NATS and the
    frontend stay healthy). Recovery: `dynkv down && dynkv up -d` serves again."""
    with stack.load() as load:
        load.wait_for(8)
        time.sleep(0.25)  # well into the streams of the clients that just started
        killed = stack.kill("worker")
        time.sleep(1.5)
        load.stop()
    before = [o for o in load.outcomes if o.started + o.seconds < killed]
    after = load.since(killed + 0.2)
    assert set(load.kinds(before)) == {"ok"}, load.kinds(before)
    assert load.kinds(after) and set(load.kinds(after)) == {"http503:no_worker_available"}
    assert set(load.kinds()) <= {"ok", "broken:stream_broken", "http503:no_worker_available"}
    assert "broken:stream_broken" in load.kinds(), load.kinds()  # in flight at the kill
    assert longest(load.outcomes) < BOUND, longest(load.outcomes)

    deadline = killed + TTL + 1
    while stack.registered() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.registered() == 0 and stack.health()["workers"] == 0

    code, status = stack.status()
    assert code == 1 and status["healthy"] is False
    services = {s["name"]: s for s in status["services"]}
    assert services["worker"]["running"] is False and services["worker"]["kvbm"] is None
    assert all(services[n]["healthy"] for n in ("etcd", "nats", "frontend"))

    assert runner.invoke(app, ["down", "--timeout", "3"]).exit_code == 0
    assert_nothing_left(stack.pids(), stack.ddir)
    up()
    stack.state = read_state(stack.ddir)
    with stack.load(clients=2) as load:
        load.wait_for(4)
    assert set(load.kinds()) == {"ok"}


def test_frontend_killed_during_load(stack):
    """Expected: streams in flight end at once with a client-side transport error (the
    connection closes mid-body: `RemoteProtocolError`), later requests are refused at once
    (`ConnectError`); nothing hangs. The worker is unaffected (still registered, healthy, and
    serving on its own port). `dynkv status --json` exits 1 with the frontend `running: false`.
    Recovery: `dynkv down && dynkv up -d` (`down` finds nothing of the frontend to stop and
    stops the rest)."""
    with stack.load() as load:
        load.wait_for(8)
        killed = stack.kill("frontend")
        time.sleep(1.0)
        load.stop()
    after = load.since(killed + 0.2)
    assert set(load.kinds(after)) == {"exception:ConnectError"}, load.kinds(after)
    in_flight = {o.kind for o in load.outcomes if o.started < killed < o.started + o.seconds}
    assert in_flight <= {"exception:RemoteProtocolError", "exception:ReadError", "ok"}, in_flight
    assert longest(load.outcomes) < BOUND

    code, status = stack.status()
    services = {s["name"]: s for s in status["services"]}
    assert code == 1 and services["frontend"]["running"] is False
    assert services["worker"]["healthy"] and stack.registered() == 1
    worker_url = services["worker"]["url"]
    body = {**BODY, "stream": False}
    direct = httpx.post(f"{worker_url}/v1/completions", json=body, timeout=5)
    assert direct.status_code == 401  # the worker answers only the frontend's key
    auth = {"authorization": f"Bearer {worker_api_key(stack.secret)}"}
    direct = httpx.post(f"{worker_url}/v1/completions", json=body, headers=auth, timeout=5)
    assert direct.status_code == 200


def test_nats_then_etcd_killed_during_load(stack):
    """Expected, NATS: nothing in the request path uses it — zero errors; `dynkv status`
    exits 1 with nats `running: false`, every other service healthy.
    Expected, etcd (killed next): serving goes on with zero errors, longer than the lease TTL
    (the frontend keeps the workers it knew, and a lease cannot expire while etcd is down);
    status shows etcd `running: false` and the worker unhealthy (its readiness includes its etcd
    key, which cannot be read). When etcd comes back with its data (restarted by whatever
    supervises it; here by hand, as external mode would), everything heals by itself: the
    worker's lease keeper reaches it again, the frontend lists again, and a worker that
    registers now is served — still with zero client errors."""
    with stack.load() as load:
        load.wait_for(4)
        stack.kill("nats")
        time.sleep(1.0)
        code, status = stack.status()
        services = {s["name"]: s for s in status["services"]}
        assert code == 1 and services["nats"]["running"] is False
        assert all(services[n]["healthy"] for n in ("etcd", "worker", "frontend"))

        etcd = stack.state.service("etcd")
        stack.kill("etcd")
        time.sleep(TTL + 2)  # past the lease TTL: nothing may expire while etcd is down
        code, status = stack.status()
        services = {s["name"]: s for s in status["services"]}
        assert code == 1 and services["etcd"]["running"] is False
        assert services["worker"]["running"] and not services["worker"]["healthy"]
        assert "etcd" in services["worker"]["detail"]
        assert stack.health()["healthy_workers"] == 1

        with open(os.path.join(stack.ddir, "logs", "etcd-again.log"), "wb") as log:
            subprocess.Popen(  # the same data dir; the run's marker, so `down` sweeps it
                etcd.argv,
                env={**os.environ, "DYNKV_INSTANCE": stack.state.instance},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: stack.registered() == 1, 10)  # the lease survived etcd's absence
        # discovery follows etcd again (its watch resumed, or it listed again)
        with EtcdClient(stack.etcd) as client:
            key = "/dynkv/faults/workers/agg-9"
            record = {"id": "agg-9", "url": "http://127.0.0.1:9", "model": "model"}
            client.put(key, signed(key, record, stack.secret))  # only signed records join
            wait_until(lambda: stack.health()["workers"] == 2, 10)
            client.delete("/dynkv/faults/workers/agg-9")
            wait_until(lambda: stack.health()["workers"] == 1, 10)
        time.sleep(1.0)
        load.stop()
    assert set(load.kinds()) == {"ok"}, load.kinds()
    assert longest(load.outcomes) < BOUND
    frontend_log = Path(stack.ddir, "logs", "frontend.log").read_text()
    assert "worker left: agg-0" not in frontend_log


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, EtcdError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s")
