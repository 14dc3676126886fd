"""The frontend process (`python -m dynkv.frontend`) against real etcd and real worker wrappers
around the fake vLLM: discovery churn (a killed worker is a 503 at once and leaves the pool within
its lease TTL; started again, it is served), the retry of a request whose worker is dead, and
what a deployment secret keeps out: rogue registrations, direct calls to a worker's port, and a
worker that hangs (SIGSTOP) without dying."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import psutil
import pytest
from infra_helpers import FAKES, wait_for
from tls_support import self_signed

from dynkv.infra.etcd_client import EtcdClient
from dynkv.ports import free_port
from dynkv.worker.record import (
    DEPLOYMENT_SECRET_ENV,
    WorkerRecord,
    signed,
    worker_api_key,
    worker_key,
)

pytestmark = pytest.mark.integration
TTL = 3
MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNKV_", "DYN_KVBM_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(FAKES)) if p)
    return env


class Stack:
    """One deployment namespace in the shared etcd: workers and a frontend, as processes."""

    def __init__(self, etcd_url: str, tmp_path, secret: str | None = None) -> None:
        self.etcd_url, self.tmp, self.secret = etcd_url, tmp_path, secret
        self.worker_ports: dict[str, int] = {}
        self.deployment = f"f{uuid.uuid4().hex[:6]}"
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def worker(self, worker_id: str) -> subprocess.Popen:
        port = free_port()
        argv = [
            sys.executable, "-m", "dynkv.worker",
            "--role", "agg", "--deployment", self.deployment, "--worker-id", worker_id,
            "--url", f"http://127.0.0.1:{port}", "--served-model-name", MODEL,
            "--metrics-url", "http://127.0.0.1:1/metrics", "--etcd-endpoints", self.etcd_url,
            "--lease-ttl", str(TTL),
            "--", sys.executable, "-m", "fake_vllm", "--port", str(port),
            "--served-model-name", MODEL,
        ]  # fmt: skip
        self.worker_ports[worker_id] = port
        return self._spawn(argv, f"{worker_id}-{port}.log", self._secret_env())

    def _secret_env(self) -> dict[str, str]:
        """With a secret, also a dead proxy in every variable: loopback clients ignore it."""
        if not self.secret:
            return {}
        proxies = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
        return {DEPLOYMENT_SECRET_ENV: self.secret, **proxies}

    def frontend(self, *args: str, **env: str) -> subprocess.Popen:
        argv = [
            sys.executable, "-m", "dynkv.frontend", "--port", str(self.port),
            "--deployment", self.deployment, "--etcd-endpoints", self.etcd_url,
            "--model", MODEL, "--health-interval", "0.2", "--connect-timeout", "1", *args,
        ]  # fmt: skip
        proc = self._spawn(argv, "frontend.log", {**self._secret_env(), **env})
        wait_for(lambda: _status(f"{self.url}/health") == 200, 20)
        return proc

    def _spawn(self, argv, log_name: str, extra: dict[str, str] | None = None):
        log = open(self.tmp / log_name, "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, env={**_env(), **(extra or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def chat(self) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=CHAT, timeout=10)

    def log(self) -> str:
        return (self.tmp / "frontend.log").read_text()

    def pool_size(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=5).json()["workers"]

    def registered(self) -> list[str]:
        with EtcdClient(self.etcd_url) as etcd:
            return [kv.key for kv in etcd.get_prefix(f"/dynkv/{self.deployment}/workers/").kvs]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture
def stack(etcd_url, tmp_path):
    s = Stack(etcd_url, tmp_path)
    yield s
    s.close()


def test_discovery_churn_kill_then_restart(stack):
    stack.frontend()
    resp = stack.chat()  # known model (--model), no worker yet
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_worker_available"

    worker = stack.worker("agg-0")
    wait_for(lambda: stack.chat().status_code == 200, 20)
    assert stack.chat().json()["choices"][0]["message"]["content"].startswith("fake answer")

    os.killpg(worker.pid, signal.SIGKILL)  # no withdrawal: only the lease can tell etcd
    killed = time.monotonic()
    resp = stack.chat()
    assert resp.status_code == 503  # the connection failure took it out of rotation at once
    assert "agg-0" not in resp.text  # the reason is in the log, under the request id
    assert "agg-0" in [line for line in stack.log().splitlines()
                       if resp.json()["error"]["request_id"] in line][0]  # fmt: skip
    wait_for(lambda: stack.pool_size() == 0, TTL + 3)  # lease expired → key deleted → gone
    left_after = time.monotonic() - killed
    assert left_after <= TTL + 2, left_after
    assert stack.chat().status_code == 503

    stack.worker("agg-0")  # the same worker again, on a new port
    wait_for(lambda: stack.chat().status_code == 200, 20)
    print(f"killed worker left the pool after {left_after:.1f} s (lease TTL {TTL} s)")


def test_a_clean_stop_leaves_the_pool_at_once(stack):
    stack.frontend()
    worker = stack.worker("agg-0")
    wait_for(lambda: stack.chat().status_code == 200, 20)
    os.killpg(worker.pid, signal.SIGTERM)  # the wrapper revokes its lease
    worker.wait(10)
    wait_for(lambda: stack.pool_size() == 0, 2)
    resp = stack.chat()
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_worker_available"
    wait_for(lambda: "none is registered" in stack.log(), 2)


def test_a_dead_worker_costs_no_request(stack):
    stack.frontend()
    dead = stack.worker("agg-0")
    stack.worker("agg-1")
    wait_for(lambda: stack.pool_size() == 2, 20)
    wait_for(lambda: stack.chat().status_code == 200, 20)
    os.killpg(dead.pid, signal.SIGKILL)
    dead.wait(5)
    assert len(stack.registered()) == 2  # still registered: its lease has not expired yet
    answers = [stack.chat() for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.headers["x-dynkv-worker"] for r in answers} == {"agg-1"}
    metrics = httpx.get(f"{stack.url}/metrics", timeout=5).text
    assert f'dynkv_frontend_retries_total{{model="{MODEL}"}} 1.0' in metrics
    assert 'kind="connect",model="fake-model",worker="agg-0"' in metrics


def test_streaming_and_errors_through_the_process(stack):
    stack.frontend(DYNKV_API_KEY="sk-proc")
    stack.worker("agg-0")
    auth = {"authorization": "Bearer sk-proc"}
    wait_for(
        lambda: (
            httpx.post(
                f"{stack.url}/v1/completions",
                json={"model": MODEL, "prompt": "x"},
                headers=auth,
                timeout=5,
            ).status_code
            == 200
        ),
        20,
    )
    with httpx.stream(
        "POST", f"{stack.url}/v1/completions",
        json={"model": MODEL, "prompt": "x", "stream": True}, headers=auth, timeout=10,
    ) as resp:  # fmt: skip
        events = [line for line in resp.iter_lines() if line]
    assert len(events) == 5 and events[-1] == "data: [DONE]"
    too_long = httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": MODEL, "prompt": "FAIL_400"},
        headers=auth,
        timeout=5,
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["message"] == "too long"
    assert stack.chat().status_code == 401
    log = (stack.tmp / "frontend.log").read_text()
    assert "API key required" in log and "sk-proc" not in log


@pytest.fixture
def signed_stack(etcd_url, tmp_path):
    s = Stack(etcd_url, tmp_path, secret=uuid.uuid4().hex * 2)
    yield s
    s.close()


def test_rogue_registrations_never_receive_traffic(signed_stack):
    """Any local process can PUT under the workers prefix (loopback etcd has no auth): an
    unsigned record and one signed with another secret must never be routed to."""
    from frontend_support import FakeWorker, ServerThread

    stack = signed_stack
    stack.frontend()
    stack.worker("agg-0")
    wait_for(lambda: stack.chat().status_code == 200, 20)
    rogue = FakeWorker("rogue")
    with ServerThread(rogue.app()) as server, EtcdClient(stack.etcd_url) as etcd:
        record = WorkerRecord(id="x", url=server.url, model=MODEL, pid=1, started_at=time.time())
        unsigned_key = worker_key(stack.deployment, "rogue-unsigned")
        forged_key = worker_key(stack.deployment, "rogue-forged")
        etcd.put(unsigned_key, record.to_json())
        etcd.put(forged_key, signed(forged_key, record, "not-the-deployment-secret"))
        etcd.put(unsigned_key, {**record.to_json(), "pid": 2})  # written again: logged once
        wait_for(lambda: "rogue-forged" in stack.log(), 5)
        answers = [stack.chat() for _ in range(8)]
        assert [r.status_code for r in answers] == [200] * 8
        assert {r.headers["x-dynkv-worker"] for r in answers} == {"agg-0"}
        assert rogue.bodies == [] and stack.pool_size() == 1
        metrics = httpx.get(f"{stack.url}/metrics", timeout=5).text
        assert 'dynkv_frontend_registrations_rejected_total{reason="unsigned"} 2.0' in metrics
        assert 'dynkv_frontend_registrations_rejected_total{reason="bad_signature"} 1.0' in metrics
        log = stack.log()
        assert log.count("rogue-unsigned: unsigned record") == 1
        assert log.count("rogue-forged: signature does not match") == 1
        assert stack.secret not in log


def test_a_workers_port_answers_only_with_the_derived_key(signed_stack):
    stack = signed_stack
    stack.frontend()
    stack.worker("agg-0")
    wait_for(lambda: stack.chat().status_code == 200, 20)  # the frontend sends the key
    direct = f"http://127.0.0.1:{stack.worker_ports['agg-0']}"
    assert httpx.post(f"{direct}/v1/chat/completions", json=CHAT, timeout=5).status_code == 401
    assert httpx.get(f"{direct}/v1/models", timeout=5).status_code == 401
    wrong = {"authorization": f"Bearer {stack.secret}"}  # the secret itself is not the key
    assert httpx.get(f"{direct}/v1/models", headers=wrong, timeout=5).status_code == 401
    key = {"authorization": f"Bearer {worker_api_key(stack.secret)}"}
    assert httpx.get(f"{direct}/v1/models", headers=key, timeout=5).status_code == 200
    assert httpx.get(f"{direct}/health", timeout=5).status_code == 200  # probes stay open
    registered = EtcdClient(stack.etcd_url).get(worker_key(stack.deployment, "agg-0")).json()
    assert "signature" in registered


def test_a_hung_worker_is_a_fast_503_not_a_600s_wait(signed_stack):
    """SIGSTOP: the port still accepts connections, nothing answers. The frontend probes the
    worker's /health after --stall-probe-after and fails the request over at once."""
    stack = signed_stack
    stack.frontend("--stall-probe-after", "1", "--probe-timeout", "1")
    worker = stack.worker("agg-0")
    wait_for(lambda: stack.chat().status_code == 200, 20)
    vllm = psutil.Process(worker.pid).children()[0]
    vllm.suspend()
    try:
        started = time.monotonic()
        resp = stack.chat()
        took = time.monotonic() - started
        assert resp.status_code == 503, resp.text
        assert took < 5, took  # stall probe (1 s) + probe timeout (1 s), not the request timeout
        started = time.monotonic()
        assert stack.chat().status_code == 503  # out of rotation: answered at once
        assert time.monotonic() - started < 1
    finally:
        vllm.resume()
    wait_for(lambda: stack.chat().status_code == 200, 10)  # healthy again: back in rotation
    print(f"hung worker: 503 after {took:.1f} s")


def test_the_frontend_serves_tls_and_refuses_a_keyless_network_bind(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    base = [
        sys.executable, "-m", "dynkv.frontend", "--port", str(stack.port),
        "--deployment", stack.deployment, "--etcd-endpoints", stack.etcd_url,
    ]  # fmt: skip
    refused = subprocess.run(
        [*base, "--host", "0.0.0.0"], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 2 and "not loopback" in refused.stderr
    assert _status(f"{stack.url}/health") is None  # nothing started
    stack._spawn([*base, "--tls-cert", cert, "--tls-key", key], "frontend.log", {})
    https = f"https://127.0.0.1:{stack.port}/health"
    wait_for(lambda: _get_tls(https, cert) == 200, 20)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.url}/health", timeout=2)  # no plaintext on the TLS port


def _get_tls(url: str, cert: str) -> int | None:
    import ssl

    try:
        return httpx.get(url, verify=ssl.create_default_context(cafile=cert), timeout=1).status_code
    except httpx.HTTPError:
        return None
