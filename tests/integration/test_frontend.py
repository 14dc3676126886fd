"""The frontend process (`python -m dynkv.frontend`) against real etcd and real worker wrappers
around the fake vLLM: discovery churn (a killed worker is a 503 at once and leaves the pool within
its lease TTL; started again, it is served) and the retry of a request whose worker is dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from infra_helpers import FAKES, wait_for

from dynkv.infra.etcd_client import EtcdClient
from dynkv.ports import free_port

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

    def __init__(self, etcd_url: str, tmp_path) -> None:
        self.etcd_url, self.tmp = etcd_url, tmp_path
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
        return self._spawn(argv, f"{worker_id}-{port}.log")

    def frontend(self, **env: str) -> subprocess.Popen:
        argv = [
            sys.executable, "-m", "dynkv.frontend", "--port", str(self.port),
            "--deployment", self.deployment, "--etcd-endpoints", self.etcd_url,
            "--model", MODEL, "--health-interval", "0.2", "--connect-timeout", "1",
        ]  # fmt: skip
        proc = self._spawn(argv, "frontend.log", env)
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
    assert "agg-0" in resp.json()["error"]["message"]
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
    assert resp.status_code == 503 and "none is registered" in resp.json()["error"]["message"]


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
