"""The supervisor's own safety rules, with real processes, servers and etcd.

Expected:
- the final SIGKILL of a process group goes only to a group that is still ours: a group id that
  now belongs to someone else's process (not one we stop, no run marker) is left alone;
- probes and the etcd client talk to loopback control endpoints directly: a dead HTTP proxy in
  the environment changes nothing;
- etcd and NATS started by the supervisor carry no API key or HF token in their environment;
- a service's log is size-capped: past the cap it rotates, and only so many files are kept.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from infra_helpers import infra_plan

from dynkv.infra.etcd_client import EtcdClient
from dynkv.plan import HttpProbe, Service, TcpProbe
from dynkv.ports import free_port
from dynkv.supervisor import Supervisor, health, processes_left, stop_deployment
from dynkv.supervisor.logs import tail_lines
from dynkv.supervisor.process import terminate

pytestmark = pytest.mark.integration

IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def term_ignoring_process() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORES_TERM],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a service's
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_the_final_sigkill_spares_a_group_that_is_no_longer_ours():
    stranger = term_ignoring_process()  # holds the group id; not ours, no marker
    try:
        killed = terminate([], grace=0.3, pgids=[stranger.pid], marker="/nowhere#run")
        assert killed == 0
        assert stranger.poll() is None and psutil.pid_exists(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait(5)


def test_the_final_sigkill_still_reaches_our_own_group():
    ours = term_ignoring_process()
    try:
        killed = terminate([psutil.Process(ours.pid)], grace=0.3, pgids=[ours.pid])
        assert killed == 1  # it ignored SIGTERM: only the SIGKILL ended it
        ours.wait(5)
    finally:
        if ours.poll() is None:
            ours.kill()


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def dead_proxy(monkeypatch):
    """Every proxy variable points at a port where nothing listens; no NO_PROXY."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


def test_probes_and_the_etcd_client_ignore_a_proxy(dead_proxy, etcd_url):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        assert health.check(HttpProbe(url=url, expect_json={"status": "ok"})) == (True, "healthy")
    finally:
        server.shutdown()
        server.server_close()
    with EtcdClient(etcd_url, timeout=3) as client:
        assert client.health()
        client.put("/dynkv-proxy-test", "v")
        assert client.get("/dynkv-proxy-test") is not None


def test_infrastructure_gets_no_secret_from_the_launcher(env, monkeypatch):
    monkeypatch.setenv("DYNKV_API_KEY", "sk-launcher-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_launcher_secret")
    plan = infra_plan(env)
    state = Supervisor(plan).start(detach=True)
    try:
        for record in state.services:
            environ = psutil.Process(record.pid).environ()
            assert "DYNKV_API_KEY" not in environ and "HF_TOKEN" not in environ, record.name
            assert environ.get("DYNKV_INSTANCE") == state.instance
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    assert os.environ["HF_TOKEN"] == "hf_launcher_secret"  # the launcher's own is untouched


CHATTY = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "for i in range(3000): print(f'line {i:05d} ' + 'x' * 40)\n"
    "print('done', flush=True); time.sleep(600)\n"
)


def test_a_service_log_rotates_at_its_size_cap(env, monkeypatch):
    monkeypatch.setattr("dynkv.supervisor.process.LOG_MAX_BYTES", 16 * 1024)
    monkeypatch.setattr("dynkv.supervisor.process.LOG_KEEP", 2)
    plan = infra_plan(env)
    port = free_port()
    chatty = Service(
        name="chatty",
        role="test",
        argv=(sys.executable, "-c", CHATTY, str(port)),
        cwd=plan.deployment_dir,
        probes=(TcpProbe(host="127.0.0.1", port=port),),
        log_file=f"{plan.deployment_dir}/logs/chatty.log",
    )
    plan = plan.replace(services=(chatty,))
    sup = Supervisor(plan, poll_interval=0.1)
    state = sup.start(detach=True)
    try:
        log = Path(state.services[0].log)
        deadline = time.monotonic() + 20
        while "done" not in tail_lines(log, 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        files = [log, Path(f"{log}.1"), Path(f"{log}.2")]
        assert tail_lines(log, 1) == ["done"]
        assert all(f.stat().st_size <= 16 * 1024 for f in files)
        assert not Path(f"{log}.3").exists()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    assert processes_left(state.services, plan.deployment_dir) == []  # the writer ended too
