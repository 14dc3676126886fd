"""`dynkv up / status / logs / down` through the CLI, with real etcd and NATS and a fake vLLM
behind the real worker wrapper (the e2e test runs the real vLLM)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from infra_helpers import assert_nothing_left, use_fake_vllm, with_model_config
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.etcd_client import EtcdClient
from dynkv.supervisor import read_state
from dynkv.worker.record import decode

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    env, model = use_fake_vllm(monkeypatch, tmp_path, "cli")
    with_model_config(model)
    yield env, model
    runner.invoke(app, ["down"])


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_up_detached_status_logs_down(deployment):
    env, model = deployment
    result = invoke("up", "-d", "--json", "--model", str(model), "--device", "cpu")
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert [s["name"] for s in state["services"]] == ["etcd", "nats", "worker", "frontend"]
    pids = [(s["pid"], s["create_time"]) for s in state["services"]]
    ddir = os.path.join(env["DYNKV_STATE_DIR"], "cli")

    # registered in etcd, under the deployment's namespace
    with EtcdClient(f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}") as etcd:
        (kv,) = etcd.get_prefix("/dynkv/cli/workers/").kvs
        assert kv.key == "/dynkv/cli/workers/agg-0"
        assert kv.json()["model"] == "model"  # a directory serves under its name
        assert "signature" in kv.json()  # signed with the deployment secret

    # the deployment secret: created once, private, never in argv, the state file or a log
    secret_file = os.path.join(ddir, "deployment.secret")
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    secret = Path(secret_file).read_text().strip()
    assert len(secret) == 64
    assert decode(kv.key, kv.value, secret).id == "agg-0"
    for log in Path(ddir, "logs").iterdir():
        assert secret not in log.read_text()
    assert secret not in json.dumps(state)
    worker_url = f"http://127.0.0.1:{env['DYNKV_WORKER_PORT']}"
    assert httpx.get(f"{worker_url}/v1/models", timeout=5).status_code == 401  # keyed
    assert httpx.get(f"{worker_url}/health", timeout=5).status_code == 200

    # the OpenAI API through the frontend, which found the worker in etcd
    frontend = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(f"{frontend}/v1/chat/completions", json=chat, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].startswith("fake answer")
    assert answer.headers["x-dynkv-worker"] == "agg-0"

    status = invoke("status", "--json")
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["name"] == "cli" and data["healthy"] is True
    services = {s["name"]: s for s in data["services"]}
    for svc in services.values():
        assert {"name", "role", "pid", "healthy", "ports", "kvbm"} <= set(svc)
        assert svc["healthy"] is True and svc["pid"] > 0
    worker = services["worker"]
    assert worker["role"] == "agg" and worker["ports"]["http"] == int(env["DYNKV_WORKER_PORT"])
    assert worker["kvbm"]["reachable"] is True
    assert worker["kvbm"]["host_cache_hit_rate"] == 0.25
    assert worker["kvbm"]["host_blocks_used"] == 3 and worker["kvbm"]["matched_tokens"] == 64
    assert worker["kvbm"]["disk_cache_hit_rate"] is None  # absent family: tolerated
    assert services["etcd"]["kvbm"] is None
    assert services["frontend"]["role"] == "frontend" and services["frontend"]["url"] == frontend
    # the frontend's router, read from its /metrics: one decision, all of it on the one worker
    assert data["router"]["policy"] == "round_robin"
    assert data["router"]["decisions"] == {"round_robin": 1}
    assert data["router"]["shares"] == {"agg-0": 1.0}

    human = invoke("status")
    assert human.exit_code == 0 and "healthy" in human.stderr and "KVBM" in human.stderr
    assert "router: policy round_robin; decisions round_robin 1" in human.stderr

    logs = invoke("logs", "worker")
    assert logs.exit_code == 0
    assert "worker | " in logs.stdout and "registered /dynkv/cli/workers/agg-0" in logs.stdout
    frontend_log = invoke("logs", "frontend")
    assert frontend_log.exit_code == 0 and "frontend | " in frontend_log.stdout
    assert "worker joined: agg-0" in frontend_log.stdout
    tail = invoke("logs", "--tail", "1", "etcd", "nats")
    assert tail.exit_code == 0 and len(tail.stdout.splitlines()) == 2
    unknown = invoke("logs", "nope")
    assert unknown.exit_code == 1 and "no service nope" in unknown.stderr

    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynkv.cli.main",
            "status",
            "--watch",
            "--json",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    follow = subprocess.Popen(
        [sys.executable, "-m", "dynkv.cli.main", "logs", "-f", "--tail", "0", "worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    # each refresh is one line, flushed; the watch's probes make the fake vLLM log requests
    docs = [json.loads(watch.stdout.readline()) for _ in range(2)]
    followed = follow.stdout.readline()
    for proc in (watch, follow):
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)  # a loaded 2-core CI box: a probe may be mid-flight
        assert proc.returncode == 130
    assert all(d["healthy"] and d["name"] == "cli" for d in docs)
    assert followed.startswith("worker | fake_vllm:") and "GET /health" in followed

    again = invoke("up", "-d", "--model", str(model))
    assert again.exit_code == 1
    assert "already running" in again.stderr and "dynkv down --name cli" in again.stderr

    down = invoke("down")
    assert down.exit_code == 0 and "is down" in down.stderr
    assert_nothing_left(pids, ddir)

    gone = invoke("status", "--json")
    assert gone.exit_code == 1 and "no deployment named 'cli'" in gone.stderr
    assert invoke("down").exit_code == 0  # idempotent
    assert "registered" in invoke("logs", "worker").stdout  # logs outlive the deployment


def test_status_reports_a_killed_worker(deployment):
    _, model = deployment
    assert invoke("up", "-d", "--model", str(model)).exit_code == 0
    state = read_state(os.path.join(os.environ["DYNKV_STATE_DIR"], "cli"))
    os.killpg(state.service("worker").pgid, signal.SIGKILL)
    time.sleep(0.3)
    status = invoke("status", "--json")
    assert status.exit_code == 1
    worker = next(s for s in json.loads(status.stdout)["services"] if s["name"] == "worker")
    assert worker["healthy"] is False and worker["kvbm"] is None


def test_taken_port_fails_preflight_naming_its_owner(deployment):
    env, model = deployment
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(env["DYNKV_WORKER_PORT"])))
        sock.listen()
        result = invoke("up", "-d", "--model", str(model))
    assert result.exit_code == 1
    assert f"pid {os.getpid()}" in result.stderr and "DYNKV_WORKER_PORT" in result.stderr
    assert read_state(os.path.join(env["DYNKV_STATE_DIR"], "cli")) is None  # nothing started


def test_skip_checks_is_loud(deployment):
    _, model = deployment
    result = invoke("up", "-d", "--skip-checks", "--model", str(model))
    assert result.exit_code == 0, result.output
    assert "--skip-checks" in result.stderr and "NOT checking" in result.stderr


FOREGROUND = (
    "import sys, dynkv.plan.worker as w; w.VLLM_MODULE = 'fake_vllm'; "
    "from dynkv.cli.main import main; sys.argv[0] = 'dynkv'; main()"
)


def _default_sigint() -> None:
    """A job started in the background by a non-interactive shell (`.ci/run &`) ignores SIGINT,
    and so would every process pytest starts: these tests send SIGINT, so their children get
    the default disposition back (Python then raises KeyboardInterrupt, as in a terminal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _foreground_up(model, *, stdout: int) -> subprocess.Popen:
    """`dynkv up` in the foreground, as a terminal runs it (SIGINT's default disposition)."""
    return subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, "up", "--model", str(model)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _until_running(proc: subprocess.Popen, ddir: str):
    """The deployment's state once it runs (or the last one read after 120 s); `proc` must not
    exit meanwhile."""
    deadline = time.monotonic() + 120
    state = None
    while time.monotonic() < deadline:
        state = read_state(ddir)
        if state is not None and state.phase == "running":
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return state


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_up_streams_logs_and_stops_everything_on_a_signal(deployment, sig):
    env, model = deployment
    proc = _foreground_up(model, stdout=subprocess.PIPE)
    ddir = os.path.join(env["DYNKV_STATE_DIR"], "cli")
    try:
        state = _until_running(proc, ddir)
        assert state is not None and state.mode == "foreground"
        assert state.supervisor_pid == proc.pid
        assert invoke("status").exit_code == 0  # its probes make the fake log a line
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)  # stops four services, each with a grace
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert re.search(r"^worker +\| ", out, re.M) and "GET /health" in out  # padded to "frontend"
    assert "stopping" in err
    assert_nothing_left([(s.pid, s.create_time) for s in state.services], ddir)
    assert read_state(ddir) is None


def test_down_stops_a_foreground_up_from_another_terminal(deployment):
    env, model = deployment
    proc = _foreground_up(model, stdout=subprocess.DEVNULL)
    ddir = os.path.join(env["DYNKV_STATE_DIR"], "cli")
    try:
        state = _until_running(proc, ddir)
        result = invoke("down")
        assert result.exit_code == 0, result.output
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not psutil.pid_exists(proc.pid) or proc.returncode is not None
    assert_nothing_left([(s.pid, s.create_time) for s in state.services], ddir)


def test_up_with_an_api_key_serves_only_bearers_and_never_shows_the_key(deployment):
    env, model = deployment
    secret = "sk-integration-do-not-leak"
    result = invoke("up", "-d", "--model", str(model), "--api-key", secret)
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    assert "Authorization: Bearer $DYNKV_API_KEY" in result.stderr
    assert f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}/v1" in result.stderr
    frontend = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}"
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}]}
    anonymous = httpx.post(f"{frontend}/v1/chat/completions", json=chat, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    bearer = {"authorization": f"Bearer {secret}"}
    ok = httpx.post(f"{frontend}/v1/chat/completions", json=chat, headers=bearer, timeout=10)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{frontend}/health", timeout=5).status_code == 200  # no key needed
    assert invoke("status").exit_code == 0
    ddir = os.path.join(env["DYNKV_STATE_DIR"], "cli")
    for path in [os.path.join(ddir, "state.json")] + [
        os.path.join(ddir, "logs", name) for name in os.listdir(os.path.join(ddir, "logs"))
    ]:
        with open(path, encoding="utf-8", errors="replace") as f:
            assert secret not in f.read(), path
    state = read_state(ddir)
    frontend_pid = state.service("frontend").pid
    with open(f"/proc/{frontend_pid}/environ", "rb") as f:
        assert f"DYNKV_API_KEY={secret}".encode() in f.read().split(b"\0")
    worker_pid = state.service("worker").pid
    with open(f"/proc/{worker_pid}/environ", "rb") as f:
        assert b"DYNKV_API_KEY" not in f.read()


def test_bench_serve_finds_the_workers_metrics_from_the_deployment(deployment):
    """`--url` in the openai client's form (with /v1), or `--name`: either way the workers'
    KVBM metrics come from the deployment itself, with no --metrics-url."""
    env, model = deployment
    assert invoke("up", "-d", "--model", str(model), "--device", "cpu").exit_code == 0
    small = ["--users", "1", "--rounds", "1", "--system-tokens", "8", "--question-tokens", "4"]
    worker_metrics = f"http://127.0.0.1:{env['DYN_KVBM_METRICS_PORT']}/metrics"
    for target in (
        ["--url", f"http://localhost:{env['DYNKV_FRONTEND_PORT']}/v1"],
        ["--name", "cli"],
    ):
        result = invoke("bench", "serve", *target, *small, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["completed"] == 1, data
        assert data["config"]["metrics_urls"] == [worker_metrics]
        assert data["config"]["deployment"] == "cli"
        assert data["hit_rates"]["host"] == 0.25  # the fake's gauge
