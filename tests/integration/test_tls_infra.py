"""An advertised deployment's etcd and NATS, started for real by the supervisor from the plan of
`up --advertise 127.0.0.2` (docs/multi-host.md): the certificates it made let dynkv's clients in,
and a client without them, without the token or without TLS is refused. A worker-like HTTPS
server with a CA-issued certificate is reachable by the frontend's upstream client only when the
client trusts the CA. Traffic stays on 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats.errors
import pytest
from infra_helpers import infra_plan, port_env

from dynkv.frontend.upstream import make_client
from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.plan import HttpProbe, Plan
from dynkv.ports import free_port
from dynkv.router.subscriber import nats_connect_options
from dynkv.supervisor import Supervisor, stop_deployment
from dynkv.supervisor.health import check
from dynkv.tls.ca import DeploymentCA
from dynkv.tls.model import ClientTLS, TransportSecurity

pytestmark = pytest.mark.integration

ADDR = "127.0.0.2"


@pytest.fixture(scope="module")
def advertised(tmp_path_factory) -> Iterator[Plan]:
    tmp = tmp_path_factory.mktemp("tls")
    env = port_env(tmp / "state", name="tls") | {"DYNKV_ADVERTISE": ADDR}
    plan = infra_plan(env)
    Supervisor(plan).start(detach=True)
    try:
        yield plan
    finally:
        stop_deployment(plan.deployment_dir)


def security(plan: Plan) -> TransportSecurity:
    assert plan.transport_security is not None
    return plan.transport_security


def token(plan: Plan) -> str:
    return plan.service("nats").env["DYNKV_NATS_TOKEN"]


def test_up_made_a_private_ca_and_certificates(advertised):
    tls = security(advertised)
    directory = Path(tls.dir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert {p.name for p in files} >= {"ca.crt", "ca.key", "etcd.crt", "nats.key", "cli-client.crt"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    # the supervisor's probes got in: etcd and NATS are healthy over TLS
    assert check(advertised.service("etcd").probes[0], timeout=3.0) == (True, "healthy")


def test_etcd_with_the_ca_and_a_client_certificate_reads_and_writes(advertised):
    tls = security(advertised)
    assert advertised.etcd_endpoints == (
        f"https://{ADDR}:{advertised.service('etcd').ports['client']}",
    )
    with EtcdClient(advertised.etcd_endpoints, tls=tls.client("cli")) as client:
        client.put("/dynkv/tls/probe", {"ok": True})
        assert client.get("/dynkv/tls/probe").json() == {"ok": True}


def test_etcd_refuses_a_client_without_the_certificate(advertised, tmp_path):
    tls = security(advertised)
    endpoints = advertised.etcd_endpoints
    foreign_ca = DeploymentCA.ensure(tmp_path / "other", "other")
    cert, key = foreign_ca.issue("intruder", client=True).write(tmp_path / "other", "intruder")
    refused = [
        ClientTLS(ca=tls.ca_cert),  # trusts the server, shows no certificate
        ClientTLS(ca=tls.ca_cert, cert=str(cert), key=str(key)),  # a certificate from another CA
    ]
    clients = [EtcdClient(endpoints, tls=t, timeout=3) for t in refused]
    clients.append(EtcdClient(endpoints, timeout=3))  # does not trust the deployment's CA
    plain = endpoints[0].replace("https://", "http://")
    clients.append(EtcdClient(plain, timeout=3))  # no TLS at all
    for client in clients:
        with client, pytest.raises(EtcdError):
            client.get("/dynkv/tls/probe")


async def _connect(url: str, **options):
    import nats

    return await nats.connect(
        servers=url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=10, **options
    )


def test_nats_with_the_ca_and_the_token_publishes_and_subscribes(advertised):
    environ = {
        "DYNKV_CLIENT_CA": security(advertised).ca_cert,
        "DYNKV_NATS_TOKEN": token(advertised),
    }

    async def run() -> bytes:
        # the router subscriber's options and the KV event publisher's, from the same environment
        sub = await _connect(advertised.nats_url, **nats_connect_options(environ))
        publisher_options = KvEventsSettings.model_validate(environ).nats_options()
        pub = await _connect(advertised.nats_url, **publisher_options)
        try:
            box = await sub.subscribe("dynkv.tls.kv.test")
            await sub.flush()
            # Twice in about ten CI runs a first message did not arrive within 10 s although both
            # clients stayed connected and the server logged nothing (never reproduced here: 15
            # runs alone or under load). KV events tolerate a lost message (a sequence gap asks
            # for a snapshot, docs/kv-events.md), so this checks that messages flow over TLS with
            # the token, publishing again each second, and warns when one was lost.
            for attempt in range(1, 11):
                await pub.publish("dynkv.tls.kv.test", b"over tls")
                await pub.flush(timeout=10)  # the server has it once this PING is answered
                assert sub.is_connected, "the subscriber lost its connection"
                try:
                    msg = await box.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    continue
                if attempt > 1:
                    warnings.warn(f"NATS over TLS: {attempt - 1} message(s) lost", stacklevel=1)
                return msg.data
            raise AssertionError("no message arrived over TLS in 10 attempts")
        finally:
            await pub.close()
            await sub.close()

    assert advertised.nats_url.startswith(f"tls://{ADDR}:")
    assert asyncio.run(run()) == b"over tls"


def test_nats_refuses_a_client_without_the_token_or_without_tls(advertised):
    tls = security(advertised)
    url = advertised.nats_url

    async def refused(**options) -> Exception:
        try:
            nc = await _connect(url, **options)
        except Exception as exc:
            return exc
        await nc.close()
        raise AssertionError(f"NATS let a client in with {sorted(options)}")

    ctx = tls.client("cli").ssl_context()
    no_token = asyncio.run(refused(tls=ctx))
    assert "authorization" in str(no_token).lower()
    asyncio.run(refused(tls=ctx, token="not-the-token"))
    # without TLS: nats-py upgrades only when given a context; a default one does not trust the CA
    asyncio.run(refused(token=token(advertised)))
    # and a raw plaintext CONNECT gets nothing but the TLS requirement
    host, port = url.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        assert b'"tls_required":true' in sock.recv(4096)
        sock.sendall(b'CONNECT {"auth_token":"x"}\r\nPING\r\n')
        time.sleep(0.3)
        assert b"PONG" not in sock.recv(4096)


@pytest.fixture
def https_worker(advertised) -> Iterator[str]:
    """A worker-like HTTPS server (uvicorn, like vLLM) with the CA-issued worker certificate."""
    import uvicorn

    files = security(advertised).service("worker").server
    assert files is not None

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=files.cert,
        ssl_keyfile=files.key,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def test_the_frontends_upstream_client_reaches_a_ca_issued_worker_only_trusting_the_ca(
    advertised, https_worker
):
    tls = security(advertised)

    async def get(client: httpx.AsyncClient) -> int:
        async with client:
            return (await client.get(f"{https_worker}/health")).status_code

    def upstream(**kw) -> httpx.AsyncClient:
        return make_client(connect_timeout=3, request_timeout=5, max_connections=4, **kw)

    assert asyncio.run(get(upstream(tls=ClientTLS(ca=tls.ca_cert)))) == 200
    assert asyncio.run(get(upstream(tls=tls.client("frontend")))) == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(get(upstream()))  # the system's trust store does not know the CA
    other = DeploymentCA.ensure(Path(tls.dir).parent / "other-ca", "other")
    other_ca = Path(tls.dir).parent / "other-ca" / "ca.crt"
    assert other.fingerprint != DeploymentCA.load(Path(tls.dir)).fingerprint
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(get(upstream(tls=ClientTLS(ca=str(other_ca)))))
    # the supervisor's probe of a worker's /health, as the plan writes it
    probe = HttpProbe(url=f"{https_worker}/health", tls=tls.client("cli"))
    assert check(probe, timeout=3.0) == (True, "healthy")
    assert os.path.exists(tls.ca_key)
