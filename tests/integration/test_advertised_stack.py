"""`dynkv up -d --advertise 127.0.0.2` end to end with the fake vLLM (tests/fakes/fake_vllm.py,
which serves https like vLLM with --ssl-certfile): the worker wrapper registers its https URL in
etcd over TLS with its client certificate, the frontend discovers it there and reaches it over
https trusting only the deployment CA, clients reach the frontend on the advertised address
verifying its CA-issued certificate, and `status` and `down` work (docs/multi-host.md)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pytest
from infra_helpers import assert_nothing_left, use_fake_vllm, with_model_config
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.supervisor import read_state
from dynkv.tls.ca import DeploymentCA
from dynkv.tls.model import ClientTLS

pytestmark = pytest.mark.integration
runner = CliRunner()
ADDR = "127.0.0.2"


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    env, model = use_fake_vllm(monkeypatch, tmp_path, "adv")
    with_model_config(model)
    yield env, model
    runner.invoke(app, ["down"])


def refused_while_a_port_is_held_on_the_address(env, model) -> None:
    """NATS binds only ADDR under --advertise: a port held there (not on 127.0.0.1) is found by
    the preflight, with its owner and a fix, before anything starts; and by a plain `doctor`.
    (Run first in the end-to-end test, whose `up` then reuses the vLLM probe this one paid.)"""
    port = int(env["DYNKV_NATS_PORT"])
    with socket.socket() as sock:
        sock.bind((ADDR, port))
        sock.listen()
        up = runner.invoke(
            app, ["up", "-d", "--model", str(model), "--device", "cpu", "--advertise", ADDR]
        )
        doctor = runner.invoke(
            app, ["doctor", "--model", str(model), "--device", "cpu"], env={"DYNKV_ADVERTISE": ADDR}
        )
    assert up.exit_code == 1, up.output
    assert doctor.exit_code == 1, doctor.output
    for result in (up, doctor):
        assert f"client port {port} is taken by" in result.stderr, result.output
        assert f"pid {os.getpid()}" in result.stderr and "DYNKV_NATS_PORT=" in result.stderr
    assert read_state(Path(env["DYNKV_STATE_DIR"]) / "adv") is None  # nothing started


def test_an_advertised_deployment_serves_over_tls_end_to_end(deployment):
    env, model = deployment
    refused_while_a_port_is_held_on_the_address(env, model)
    up = runner.invoke(
        app, ["up", "-d", "--json", "--model", str(model), "--device", "cpu", "--advertise", ADDR]
    )
    assert up.exit_code == 0, up.output
    state = json.loads(up.stdout)
    pids = [(s["pid"], s["create_time"]) for s in state["services"]]
    ddir = Path(env["DYNKV_STATE_DIR"]) / "adv"
    tls_dir = ddir / "tls"
    ca = str(tls_dir / "ca.crt")
    cli = ClientTLS(
        ca=ca, cert=str(tls_dir / "cli-client.crt"), key=str(tls_dir / "cli-client.key")
    )
    assert DeploymentCA.load(tls_dir).fingerprint.startswith("sha256:")
    token = None
    for svc in state["services"]:
        environ = Path(f"/proc/{svc['pid']}/environ").read_bytes().split(b"\0")
        found = [e for e in environ if e.startswith(b"DYNKV_NATS_TOKEN=")]
        if svc["name"] == "nats":
            token = found[0].split(b"=", 1)[1].decode()
    assert token and token not in json.dumps(state)
    for log in (ddir / "logs").iterdir():
        assert token not in log.read_text()

    # the registration is in etcd, over TLS, with the worker's https URL
    etcd = f"https://{ADDR}:{env['DYNKV_ETCD_PORT']}"
    with EtcdClient(etcd, tls=cli) as client:
        (kv,) = client.get_prefix("/dynkv/adv/workers/").kvs
        assert kv.json()["url"] == f"https://127.0.0.1:{env['DYNKV_WORKER_PORT']}"
    with EtcdClient(etcd, tls=ClientTLS(ca=ca), timeout=3) as client, pytest.raises(EtcdError):
        client.get_prefix("/dynkv/adv/workers/")  # no client certificate: refused

    # the OpenAI API on the advertised address, over https from the deployment CA
    frontend = f"https://{ADDR}:{env['DYNKV_FRONTEND_PORT']}"
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(
        f"{frontend}/v1/chat/completions", json=chat, timeout=10, verify=cli.ssl_context()
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].startswith("fake answer")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{frontend}/health", timeout=5)  # the system's trust store does not know it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}/health", timeout=5)
    worker = f"https://127.0.0.1:{env['DYNKV_WORKER_PORT']}"
    assert httpx.get(f"{worker}/health", timeout=5, verify=cli.ssl_context()).status_code == 200

    # `bench serve` finds the deployment that serves the URL and verifies against its CA: the
    # workload, and the router comparison's reads of the frontend's /metrics
    workload = ["--users", "1", "--rounds", "2", "--system-tokens", "16", "--question-tokens"]
    workload += ["4", "--answer-tokens", "2", "--compare-router", "round_robin", "--json"]
    bench = runner.invoke(app, ["bench", "serve", "--url", f"{frontend}/v1", *workload])
    assert bench.exit_code == 0, bench.output
    (run,) = json.loads(bench.stdout)["runs"]
    assert run["completed"] == run["requests"] == 2, run
    assert run["config"]["ca_cert"] == ca and run["config"]["ca_cert_from"] == "deployment adv"
    assert run["router"].get("error") is None, run["router"]

    status = runner.invoke(app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["healthy"] is True, data
    assert {s["name"]: s["url"] for s in data["services"]}["frontend"] == frontend

    down = runner.invoke(app, ["down"])
    assert down.exit_code == 0, down.output
    assert_nothing_left(pids, ddir)
    assert os.path.exists(tls_dir / "ca.key")  # the CA outlives `down`, like the secret
