"""Ports and etcd/NATS for real: sockets this test holds, and real etcd and nats-server processes
from the embedded binaries, checked as `external` endpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import httpx
import pytest
from doctor_support import base_env, run

from dynkv.doctor import Status
from dynkv.doctor.check_infra import nats_info, redact
from dynkv.infra.binaries import etcd_binary, nats_server_binary
from dynkv.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def listener():
    """A listening socket on a free port, held by this test process."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_taken_port_names_this_process(tmp_path, listener):
    res = run(base_env(tmp_path, DYNKV_FRONTEND_PORT=str(listener)))
    check = res["ports.frontend"]
    assert check.status is Status.FAIL
    assert f"port {listener} is taken by pid {os.getpid()}" in check.detail
    assert check.fix.startswith(f"kill {os.getpid()}   # or: export DYNKV_FRONTEND_PORT=")
    suggested = int(check.fix.rsplit("=", 1)[1])
    assert suggested != listener


def test_port_held_by_this_deployment_is_fine(tmp_path, listener):
    env = base_env(tmp_path, DYNKV_NATS_PORT=str(listener))
    check = run(env, owned_pids={os.getpid()})["ports.nats"]
    assert check.status is Status.OK and f"this deployment, pid {os.getpid()}" in check.detail


def test_worker_and_metrics_ports_cover_every_worker(tmp_path, listener):
    env = base_env(
        tmp_path,
        DYNKV_TOPOLOGY="disagg",
        DYNKV_WORKER_PORT=str(listener - 1),
        DYN_KVBM_METRICS="true",
    )
    res = run(env)
    assert res["ports.workers"].status is Status.FAIL  # worker 1 = base + 1 is taken
    assert "worker 1 port" in res["ports.workers"].detail
    assert "KVBM metrics 1" in res["ports.kvbm_metrics"].detail


def test_metrics_ports_only_when_metrics_are_on(tmp_path):
    assert "ports.kvbm_metrics" not in run(base_env(tmp_path))


def test_colliding_settings_fail(tmp_path):
    env = base_env(tmp_path)
    env["DYNKV_WORKER_PORT"] = env["DYNKV_FRONTEND_PORT"]
    check = run(env)["ports.distinct"]
    assert check.status is Status.FAIL and "frontend and worker 0" in check.detail


def test_frontend_host_that_is_not_local(tmp_path):
    check = run(base_env(tmp_path, DYNKV_FRONTEND_HOST="203.0.113.7"))["ports.frontend"]
    assert check.status is Status.FAIL and "not an address of this host" in check.detail


def test_external_ports_are_not_checked(tmp_path):
    res = run(base_env(tmp_path, DYNKV_INFRA="external", DYNKV_ETCD_ENDPOINTS="http://127.0.0.1:1"))
    assert "ports.etcd" not in res and "ports.nats" not in res


# --- embedded, docker, external ------------------------------------------------------------
def test_embedded_binaries_and_the_etcd_caveat(tmp_path):
    res = run(base_env(tmp_path))
    assert res["infra.etcd"].status is Status.OK and "embedded etcd" in res["infra.etcd"].detail
    assert res["infra.nats"].status is Status.OK
    note = res["infra.etcd_version"]
    assert note.status is Status.OK
    if "3.5.1" in note.detail:
        assert "fixed in 3.5.3" in note.detail and "--infra external" in note.detail


def test_docker_mode_without_an_engine_fails_with_a_fix(tmp_path):
    env = base_env(tmp_path, DYNKV_INFRA="docker", DOCKER_HOST="unix:///nonexistent/docker.sock")
    res = run(env)
    check = res["infra.docker"]
    assert check.status is Status.FAIL
    assert "--infra embedded" in check.fix
    assert "infra.etcd" not in res and "ports.etcd" in res  # docker publishes the ports


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    client, peer = free_port(), free_port()
    data = tmp_path_factory.mktemp("etcd")
    proc = subprocess.Popen(
        [
            str(etcd_binary()),
            "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{client}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("health") == "true":
                break
        except (httpx.HTTPError, ValueError):
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("etcd did not become healthy")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def nats_server():
    port = free_port()
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while nats_info(f"nats://127.0.0.1:{port}", timeout=0.5) is not None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("nats-server did not start")
        time.sleep(0.1)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_external_endpoints_healthy(tmp_path, etcd_server, nats_server):
    env = base_env(
        tmp_path,
        DYNKV_INFRA="external",
        DYNKV_ETCD_ENDPOINTS=etcd_server,
        DYNKV_NATS_URL=nats_server,
    )
    res = run(env)
    assert res["infra.etcd"].status is Status.OK, res["infra.etcd"]
    assert res["infra.nats"].status is Status.OK, res["infra.nats"]
    # a maintained cluster would be ≥ 3.5.3; the wheel's 3.5.1 gets the warning
    assert res["infra.etcd_version"].status is Status.WARN
    assert res["infra.etcd_version"].fix == "upgrade the etcd cluster to ≥ 3.5.3"


def test_external_endpoints_down(tmp_path):
    dead = free_port()
    env = base_env(
        tmp_path,
        DYNKV_INFRA="external",
        DYNKV_ETCD_ENDPOINTS=f"http://user:hunter2@127.0.0.1:{dead}",
        DYNKV_NATS_URL=f"nats://127.0.0.1:{dead}",
    )
    res = run(env)
    assert (
        res["infra.etcd"].status is Status.FAIL and "DYNKV_ETCD_ENDPOINTS" in res["infra.etcd"].fix
    )
    assert res["infra.nats"].status is Status.FAIL and "DYNKV_NATS_URL" in res["infra.nats"].fix
    assert "hunter2" not in res["infra.etcd"].detail and "user:***@" in res["infra.etcd"].detail


def test_a_server_that_is_not_nats():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    problem = nats_info(f"nats://127.0.0.1:{server.getsockname()[1]}", timeout=2)
    thread.join(5)
    server.close()
    assert problem is not None and "no INFO greeting" in problem


def test_a_silent_server_times_out_instead_of_hanging(listener):
    started = time.monotonic()
    problem = nats_info(f"nats://127.0.0.1:{listener}", timeout=0.5)
    assert problem is not None and time.monotonic() - started < 5


def test_redact():
    assert redact("nats://a:b@h:4222") == "nats://a:***@h:4222"
    assert redact("http://127.0.0.1:2379") == "http://127.0.0.1:2379"
