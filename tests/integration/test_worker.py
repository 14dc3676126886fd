"""The worker wrapper against real etcd, with a fake vLLM: registration only once healthy,
withdrawal on SIGTERM (to the wrapper or its whole group) and when vLLM dies, vLLM's exit code,
a signed record and a keyed vLLM with a deployment secret, a hung vLLM (SIGSTOP) withdrawn and
registered again, and a key deleted by someone else put back."""

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

from dynkv.infra.etcd_client import EtcdClient
from dynkv.ports import free_port
from dynkv.worker.record import DEPLOYMENT_SECRET_ENV, decode, worker_api_key

pytestmark = pytest.mark.integration


def start_wrapper(etcd_url: str, tmp_path, *fake_args: str, wrapper_args=(), env_extra=None):
    deployment = f"w{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH", ""), str(FAKES)) if p
    )
    argv = [
        sys.executable, "-m", "dynkv.worker",
        "--role", "agg",
        "--deployment", deployment,
        "--worker-id", "agg-0",
        "--url", f"http://127.0.0.1:{port}",
        "--served-model-name", "fake-model",
        "--metrics-url", "http://127.0.0.1:1/metrics",
        "--etcd-endpoints", etcd_url,
        "--lease-ttl", "5", *wrapper_args,
        "--", sys.executable, "-m", "fake_vllm", "--port", str(port), *fake_args,
    ]  # fmt: skip
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, f"/dynkv/{deployment}/workers/agg-0", port


@pytest.fixture
def etcd(etcd_url):
    with EtcdClient(etcd_url) as client:
        yield client


def children_of(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def test_registers_once_healthy_and_withdraws_on_sigterm(etcd, etcd_url, tmp_path):
    proc, key, port = start_wrapper(etcd_url, tmp_path, "--ready-after", "1.0")
    try:
        time.sleep(0.6)
        assert etcd.get(key) is None  # listening but not healthy yet: not registered
        kv = wait_for(lambda: etcd.get(key))
        record = kv.json()
        assert record["id"] == "agg-0" and record["role"] == "agg"
        assert record["url"] == f"http://127.0.0.1:{port}" and record["model"] == "fake-model"
        assert record["metrics_url"] == "http://127.0.0.1:1/metrics"
        assert record["pid"] == children_of(proc)[0].pid
        assert record["started_at"] <= time.time()
        assert kv.lease != 0 and 0 < etcd.lease_time_to_live(kv.lease) <= 5
        vllm = children_of(proc)
        assert all(os.getpgid(c.pid) == proc.pid for c in vllm)  # same group as the wrapper

        proc.send_signal(signal.SIGTERM)  # to the wrapper alone: it must pass it on
        assert proc.wait(10) == 0
        assert etcd.get(key) is None  # withdrawn at once, not after the TTL
        assert etcd.lease_time_to_live(kv.lease) == -1
        psutil.wait_procs(vllm, timeout=5)
        assert not any(c.is_running() for c in vllm)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_group_sigterm_stops_both_and_withdraws(etcd, etcd_url, tmp_path):
    proc, key, _ = start_wrapper(etcd_url, tmp_path)
    try:
        wait_for(lambda: etcd.get(key))
        os.killpg(proc.pid, signal.SIGTERM)  # what the supervisor does
        assert proc.wait(10) == 0
        assert etcd.get(key) is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_when_vllm_dies_the_wrapper_withdraws_and_exits_with_its_code(etcd, etcd_url, tmp_path):
    proc, key, _ = start_wrapper(etcd_url, tmp_path, "--exit-after", "1.5", "--exit-code", "3")
    try:
        wait_for(lambda: etcd.get(key))
        assert proc.wait(10) == 3
        assert etcd.get(key) is None
        log = (tmp_path / "worker.log").read_text()
        assert "registered" in log and "vLLM exited with code 3" in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_vllm_failing_before_health_exits_without_registering(etcd, etcd_url, tmp_path):
    proc, key, _ = start_wrapper(
        etcd_url, tmp_path, "--ready-after", "60", "--exit-after", "0.5", "--exit-code", "7"
    )
    assert proc.wait(10) == 7
    assert etcd.get(key) is None


def test_usage_errors():
    out = subprocess.run(
        [sys.executable, "-m", "dynkv.worker", "--role", "agg"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "usage: python -m dynkv.worker [options] -- <vllm command line>"
    out = subprocess.run(
        [sys.executable, "-m", "dynkv.worker", "--role", "agg", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "the following arguments are required: --deployment" in (
        out.stderr
    )


SECRET = "ab" * 32
# a dead proxy: a client that honoured it could not reach loopback at all
PROXIES = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}


def test_signed_record_keyed_vllm_and_no_secret_in_vllms_env(etcd, etcd_url, tmp_path):
    proc, key, port = start_wrapper(
        etcd_url, tmp_path, env_extra={DEPLOYMENT_SECRET_ENV: SECRET, **PROXIES}
    )
    try:
        kv = wait_for(lambda: etcd.get(key))
        assert decode(key, kv.value, SECRET).id == "agg-0"  # signed with the deployment secret
        vllm = children_of(proc)[0]
        env = vllm.environ()
        assert DEPLOYMENT_SECRET_ENV not in env and env["VLLM_API_KEY"] == worker_api_key(SECRET)
        assert SECRET not in " ".join(vllm.cmdline()) + " ".join(psutil.Process(proc.pid).cmdline())
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, timeout=5).status_code == 401
        auth = {"authorization": f"Bearer {worker_api_key(SECRET)}"}
        assert httpx.get(url, headers=auth, timeout=5).status_code == 200
        assert SECRET not in (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_hung_vllm_is_withdrawn_and_comes_back(etcd, etcd_url, tmp_path):
    fast = ("--health-interval", "0.3", "--probe-timeout", "0.5", "--unhealthy-after", "2")
    proc, key, _ = start_wrapper(etcd_url, tmp_path, wrapper_args=fast, env_extra=PROXIES)
    try:
        wait_for(lambda: etcd.get(key))
        vllm = children_of(proc)[0]
        vllm.suspend()
        stopped = time.monotonic()
        log = tmp_path / "worker.log"
        wait_for(lambda: "withdrawing" in log.read_text(), 10)
        wait_for(lambda: etcd.get(key) is None, 5)
        assert time.monotonic() - stopped < 6  # 2 probes × (0.3 s + 0.5 s timeout), + slack
        assert proc.poll() is None  # withdrawn, not stopped
        vllm.resume()
        wait_for(lambda: etcd.get(key), 5)
        etcd.delete(key)  # a local process deletes the real registration
        wait_for(lambda: etcd.get(key), 3)  # put back under the same lease
        wait_for(lambda: "deleted by someone" in log.read_text(), 5)
        assert "answers again" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_cpus_pins_vllm_and_its_processes(etcd, etcd_url, tmp_path):
    """One of several CPU engines on a host: the wrapper runs vLLM (its API server and the
    processes it starts) on the engine's cores, not wherever the scheduler likes."""
    core = sorted(os.sched_getaffinity(0))[-1]
    proc, key, _ = start_wrapper(etcd_url, tmp_path, wrapper_args=("--cpus", str(core)))
    try:
        wait_for(lambda: etcd.get(key))
        vllm = children_of(proc)[0]
        assert vllm.cpu_affinity() == [core]
        assert f"vLLM runs on CPUs [{core}]" in (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_cpus_it_may_not_use_leave_vllm_unpinned(etcd, etcd_url, tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    proc, key, _ = start_wrapper(etcd_url, tmp_path, wrapper_args=("--cpus", "4096"))
    try:
        wait_for(lambda: etcd.get(key))  # it still serves
        assert children_of(proc)[0].cpu_affinity() == allowed
        assert "has no CPU this process may use" in (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
