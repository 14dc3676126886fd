"""The command line of dynkv's etcd, built once for every place it runs: the embedded process
(`dynkv.infra.embedded`), the `--infra docker` container (`dynkv.infra.docker`) and the exported
containers (`dynkv.export`).

Each is a one-member cluster: a name unique to the deployment, an explicit data dir (without one
etcd writes `default.etcd` into its cwd) and an `--initial-cluster` naming that member alone (the
default names a member "default" on :2380 and would not match). They differ in where etcd listens
and what it advertises: a process listens on the URL it advertises; in a container etcd listens
on every address of the container, on its standard ports, and advertises where the others reach
it (a published loopback port, a service name).
"""

from __future__ import annotations

CONTAINER_BINARY = "/usr/local/bin/etcd"  # in the upstream image, quay.io/coreos/etcd
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380  # etcd's standard ports, inside a container
ANY_ADDRESS = "0.0.0.0"


def member_name(deployment: str) -> str:
    return f"dynkv-{deployment}"


def etcd_argv(
    binary: str,
    *,
    member: str,
    data_dir: str,
    client_url: str,
    peer_url: str,
    listen_client: str | None = None,
    listen_peer: str | None = None,
) -> tuple[str, ...]:
    """etcd advertising `client_url` and `peer_url`, and listening there unless `listen_*`
    says otherwise."""
    return (
        binary,
        "--name",
        member,
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        listen_client or client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        listen_peer or peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        f"{member}={peer_url}",
    )


def container_etcd_argv(
    member: str, *, data_dir: str, client_url: str, peer_url: str
) -> tuple[str, ...]:
    """etcd in a container: listening on every address of it, on the standard ports."""
    return etcd_argv(
        CONTAINER_BINARY,
        member=member,
        data_dir=data_dir,
        client_url=client_url,
        peer_url=peer_url,
        listen_client=f"http://{ANY_ADDRESS}:{ETCD_CLIENT_PORT}",
        listen_peer=f"http://{ANY_ADDRESS}:{ETCD_PEER_PORT}",
    )
