"""The deployment seen across hosts, from its etcd: who is registered where, and the leave signal.

- `registrations`: every worker record of the deployment, grouped by the node it runs on (the
  record's `node`; the first host's workers have none), for `dynkv status` on either host.
- Leave: `dynkv down` on the first host PUTs `/dynkv/<name>/leave` before it stops etcd, and
  waits (at most `LEAVE_WAIT_S`) for the joined nodes' registrations to go; each joined node's
  supervisor asks `leave_requested` every few seconds and, once it is there, stops its workers
  (they withdraw their registrations as they stop) and exits.
- `cli_tls`: the client certificate dynkv's own commands use on this host: a joined node's own
  certificate (`tls/node.crt`), else the first host's `cli` certificate (dynkv.tls.layout).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.tls.model import ClientTLS
from dynkv.worker.record import BadRegistration, WorkerRecord, decode, workers_prefix

FIRST_HOST = "(first host)"
LEAVE_WAIT_S = 30.0
LEAVE_CHECK_S = 2.0


def leave_key(deployment: str) -> str:
    return f"/dynkv/{deployment}/leave"


def cli_tls(deployment_dir: Path) -> ClientTLS | None:
    """This host's client side of an advertised deployment; None for a loopback one."""
    tls = Path(deployment_dir) / "tls"
    ca = tls / "ca.crt"
    for stem in ("node", "cli-client"):
        cert, key = tls / f"{stem}.crt", tls / f"{stem}.key"
        if ca.is_file() and cert.is_file() and key.is_file():
            return ClientTLS(ca=str(ca), cert=str(cert), key=str(key))
    return None


def registrations(
    client: EtcdClient, deployment: str, secret: str | None
) -> dict[str, list[WorkerRecord]]:
    """node → its workers' records (signed ones only when `secret` is given), sorted by id."""
    hosts: dict[str, list[WorkerRecord]] = {}
    prefix = workers_prefix(deployment)
    for kv in client.get_prefix(prefix).kvs:
        key = kv.key
        try:
            record = decode(key, kv.value, secret)
        except BadRegistration:
            continue
        if record.id is None:
            record = record.model_copy(update={"id": key[len(prefix) :]})
        hosts.setdefault(record.node or FIRST_HOST, []).append(record)
    for records in hosts.values():
        records.sort(key=lambda r: r.id or "")
    return hosts


def request_leave(client: EtcdClient, deployment: str) -> None:
    client.put(leave_key(deployment), {"at": time.time()})


def wait_nodes_gone(
    client: EtcdClient, deployment: str, *, timeout: float = LEAVE_WAIT_S, poll: float = 0.5
) -> list[str]:
    """Wait until no joined node's worker is registered; the nodes still there at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            left = sorted(n for n in registrations(client, deployment, None) if n != FIRST_HOST)
        except EtcdError:
            return []
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll)


class LeaveCheck:
    """A joined node's supervisor hook (`Supervisor(leave=...)`): True once the first host asked
    its nodes to leave. Asks etcd at most every `every` seconds; an etcd it cannot reach is not a
    request to leave (the first host may be restarting)."""

    def __init__(
        self,
        endpoints: tuple[str, ...],
        deployment: str,
        tls: ClientTLS | None,
        *,
        every: float = LEAVE_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoints, self.deployment, self.tls = endpoints, deployment, tls
        self.every, self.clock = every, clock
        self.next_at = 0.0
        self._client: EtcdClient | None = None

    def __call__(self) -> bool:
        now = self.clock()
        if now < self.next_at:
            return False
        self.next_at = now + self.every
        if self._client is None:
            self._client = EtcdClient(self.endpoints, tls=self.tls, timeout=2.0)
        try:
            return self._client.get(leave_key(self.deployment)) is not None
        except EtcdError:
            return False


def hosts_view(deployment_dir: Path, deployment: str, endpoints: list[str]) -> dict | None:
    """`status`'s view of the whole deployment: node → its registered workers (id, role, url,
    model); None for a loopback deployment; {"error": ...} when etcd cannot be read."""
    tls = cli_tls(deployment_dir)
    if tls is None or not endpoints:
        return None
    try:
        with EtcdClient(endpoints, tls=tls, timeout=2.0) as client:
            hosts = registrations(client, deployment, None)
    except (EtcdError, OSError) as exc:
        return {"error": f"etcd not readable: {exc}"}
    return {
        node: [{"id": r.id, "role": str(r.role), "url": r.url, "model": r.model} for r in records]
        for node, records in sorted(hosts.items())
    }
