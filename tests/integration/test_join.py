"""Two hosts on one box (127.0.0.1 and 127.0.0.2, two state dirs) through the CLI, with real
etcd, NATS, frontend and worker wrapper over TLS and the fake vLLM behind the wrapper (the e2e
test, tests/e2e/test_multi_host.py, runs the real vLLM): the first host runs `up --advertise
--workers 0`, the second `join TOKEN`; wrong, expired, tampered and replayed tokens are refused
with the reason; the frontend serves from the joined worker over https; `status` shows both
hosts; the joined node's `down` withdraws its registration; the first host's `down` makes a
joined node leave (docs/multi-host.md)."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path

import httpx
import pytest
from infra_helpers import use_fake_vllm, wait_for, with_model_config
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.etcd_client import EtcdClient
from dynkv.private_deployment import fresh_ports
from dynkv.supervisor import read_state
from dynkv.tls.model import ClientTLS
from dynkv.worker.record import decode

pytestmark = pytest.mark.integration
runner = CliRunner()
NAME = "mh"
TTL = "3"


def invoke(*args: str):
    return runner.invoke(app, list(args))


class Hosts:
    """Switches this process's settings between host A and host B (the CLI reads them)."""

    def __init__(self, monkeypatch, tmp: Path) -> None:
        self.mp = monkeypatch
        (tmp / "a").mkdir()
        self.a, model = use_fake_vllm(monkeypatch, tmp / "a", NAME, DYNKV_LEASE_TTL_SECS=TTL)
        self.model = with_model_config(model)
        self.b = {
            **self.a,
            "DYNKV_STATE_DIR": str(tmp / "b" / "state"),
            "DYN_KVBM_DISK_CACHE_DIR": str(tmp / "b" / "g3"),
            **{k: v for k, v in fresh_ports().items() if "WORKER" in k or "KVBM" in k},
        }

    def use(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self.mp.setenv(key, value)

    def ddir(self, env: dict[str, str]) -> Path:
        return Path(env["DYNKV_STATE_DIR"]) / NAME


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    h = Hosts(monkeypatch, tmp_path)
    yield h
    h.use(h.b)
    invoke("down")
    h.use(h.a)
    invoke("down")


def first_host_client(h: Hosts) -> EtcdClient:
    tls = Path(h.ddir(h.a)) / "tls"
    cli = ClientTLS(
        ca=str(tls / "ca.crt"), cert=str(tls / "cli-client.crt"), key=str(tls / "cli-client.key")
    )
    return EtcdClient(f"https://127.0.0.1:{h.a['DYNKV_ETCD_PORT']}", tls=cli, timeout=3)


def join_b(h: Hosts, token: str, *extra: str, env: dict[str, str] | None = None):
    h.use(env or h.b)
    common = ("--model", str(h.model), "--device", "cpu", "--skip-checks")
    return invoke("join", token, "--advertise", "127.0.0.2", "--node", "hostb", *common, *extra)


def test_two_hosts_join_serve_and_leave(hosts):
    h = hosts
    h.use(h.a)
    up = invoke(
        "up", "-d", "--json", "--workers", "0", "--advertise", "127.0.0.1",
        "--model", str(h.model), "--device", "cpu", "--skip-checks",
    )  # fmt: skip
    assert up.exit_code == 0, up.output
    names = [s["name"] for s in json.loads(up.stdout)["services"]]
    assert names == ["etcd", "nats", "enroll", "frontend"]
    secret = (h.ddir(h.a) / "deployment.secret").read_text().strip()

    made = invoke("join-token", "--ttl", "10m")
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("dynkv1.") and "\n" not in token
    assert secret not in made.stderr
    assert stat_mode(h.ddir(h.a) / "join" / "join.key") == 0o600

    # wrong, tampered, expired: refused with the reason, nothing started on B
    bad = join_b(h, "dynkv1.garbage.mac")
    assert bad.exit_code == 2 and "damaged" in bad.output, bad.output
    prefix, payload, mac = token.split(".")
    tampered = join_b(h, f"{prefix}.{payload}.{mac[::-1]}")
    assert tampered.exit_code == 2 and "MAC does not match" in tampered.output, tampered.output
    h.use(h.a)
    short = invoke("join-token", "--ttl", "1s").stdout.strip()
    time.sleep(1.5)
    expired = join_b(h, short)
    assert expired.exit_code == 2 and "expired" in expired.output, expired.output
    assert read_state(h.ddir(h.b)) is None

    # join: registered (signed with the first host's secret) under the node's own id, over TLS
    started = time.monotonic()
    joined = join_b(h, token, "-d")
    assert joined.exit_code == 0, joined.output
    print(f"\njoin -d (fake vLLM): {time.monotonic() - started:.1f} s")
    tls_b = h.ddir(h.b) / "tls"
    assert {p.name for p in tls_b.iterdir()} == {"ca.crt", "node.crt", "node.key"}
    assert all(stat_mode(p) == 0o600 for p in tls_b.iterdir())
    with first_host_client(h) as etcd:
        (kv,) = etcd.get_prefix(f"/dynkv/{NAME}/workers/").kvs
        record = decode(kv.key, kv.value, secret)
    assert kv.key.endswith("/hostb-agg-0") and record.node == "hostb"
    b_port = h.b["DYNKV_WORKER_PORT"]
    assert record.url == f"https://127.0.0.2:{b_port}"

    # the token joined one node (a third host, C, tries it again)
    c = {**h.b, "DYNKV_STATE_DIR": str(h.ddir(h.b).parents[2] / "c" / "state")}
    again = join_b(h, token, "--node", "hostc", env=c)
    assert again.exit_code == 2 and "used already" in again.output, again.output

    # the first host's frontend serves from B's worker over https
    h.use(h.a)
    ca = str(h.ddir(h.a) / "tls" / "ca.crt")
    front = f"https://127.0.0.1:{h.a['DYNKV_FRONTEND_PORT']}"

    def answered():
        resp = httpx.post(
            f"{front}/v1/completions",
            json={"model": "model", "prompt": "hi"},
            verify=ssl.create_default_context(cafile=ca),
            timeout=5,
        )
        return resp if resp.status_code == 200 else None

    resp = wait_for(answered, timeout=20)
    assert resp.json()["choices"][0]["text"] == f"fake answer from {b_port}"

    # status on either host shows the whole deployment, by host
    for env in (h.a, h.b):
        h.use(env)
        status = invoke("status", "--json")
        hosts_seen = json.loads(status.stdout)["hosts"]
        assert [w["id"] for w in hosts_seen["hostb"]] == ["hostb-agg-0"], status.output

    # B's down withdraws its registration (well within the lease TTL)
    h.use(h.b)
    assert invoke("down").exit_code == 0
    with first_host_client(h) as etcd:
        assert etcd.get_prefix(f"/dynkv/{NAME}/workers/").kvs == []

    # B joins again (a new token), then A's down makes it leave
    h.use(h.a)
    token2 = invoke("join-token").stdout.strip()
    assert join_b(h, token2, "-d").exit_code == 0
    h.use(h.a)
    started = time.monotonic()
    down = invoke("down")
    assert down.exit_code == 0, down.output
    assert "did not leave" not in down.output
    wait_for(lambda: read_state(h.ddir(h.b)) is None, timeout=30)
    print(f"first host's down until the joined node left: {time.monotonic() - started:.1f} s")


def test_join_token_needs_an_advertised_first_host(hosts):
    h = hosts
    h.use(h.a)
    missing = invoke("join-token")
    assert missing.exit_code == 2 and "no deployment named" in missing.output
    up = invoke("up", "-d", "--model", str(h.model), "--device", "cpu", "--skip-checks")
    assert up.exit_code == 0, up.output
    loopback = invoke("join-token")
    assert loopback.exit_code == 2, loopback.output
    assert "without --advertise" in loopback.output and "--advertise" in loopback.output
    assert loopback.stdout == ""


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
