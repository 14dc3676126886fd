"""Which certificates an advertised deployment needs, where they live, and the NATS token.

`transport_security` is pure (the plan builder calls it): it names every file under
`<deployment dir>/tls/` and makes none. `materialize` (the supervisor, just before the services
start) makes the CA once and issues the listed certificates; `up --dry-run` never calls it.

The NATS token is derived from the deployment secret (HMAC, like the workers' vLLM key in
docs/security.md), so the plan needs no second secret file and `up` of the same deployment gives
the same token; knowing the token does not reveal the secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dynkv.tls.model import CertFiles, ServiceTLS, TransportSecurity

if TYPE_CHECKING:
    from dynkv.tls.ca import DeploymentCA, IssuedCert

LOOPBACK = "127.0.0.1"
CLI = "cli"  # dynkv's own commands (status, down, logs, bench) and the supervisor's probes


def tls_dir(deployment_dir: Path) -> Path:
    return deployment_dir / "tls"


def nats_token(secret: str) -> str:
    """The NATS auth token of the deployment whose secret is `secret`."""
    return hmac.new(secret.encode(), b"dynkv nats token v1", hashlib.sha256).hexdigest()


def _files(directory: Path, stem: str) -> CertFiles:
    return CertFiles(cert=str(directory / f"{stem}.crt"), key=str(directory / f"{stem}.key"))


def transport_security(
    *,
    advertise: str,
    deployment_dir: Path,
    servers: Iterable[str],
    clients: Iterable[str],
    worker_host: str = LOOPBACK,
) -> TransportSecurity:
    """The record for a deployment reachable at `advertise`: a server certificate for each name
    in `servers` (valid for `advertise` and loopback, and `worker_host`), a client certificate for
    each in `clients`, and one for `cli`."""
    directory = tls_dir(deployment_dir)
    ips = tuple(dict.fromkeys((advertise, LOOPBACK, worker_host)))
    servers, clients = list(servers), [*clients, CLI]
    services: dict[str, ServiceTLS] = {}
    for name in dict.fromkeys([*servers, *clients]):
        services[name] = ServiceTLS(
            server=_files(directory, name) if name in servers else None,
            client=_files(directory, f"{name}-client") if name in clients else None,
            ips=ips if name in servers else (),
        )
    return TransportSecurity(
        advertise=advertise,
        dir=str(directory),
        ca_cert=str(directory / "ca.crt"),
        ca_key=str(directory / "ca.key"),
        services=services,
    )


def materialize(security: TransportSecurity, deployment: str) -> DeploymentCA:
    """Make the CA (once) and issue every certificate `security` lists (again at each `up`: they
    are cheap, and a changed address is then in them)."""
    from dynkv.tls.ca import DeploymentCA  # cryptography: only an advertised `up` needs it

    directory = Path(security.dir)
    ca = DeploymentCA.ensure(directory, deployment)
    for name, svc in security.services.items():
        if svc.server is not None:
            # etcd's JSON gateway dials etcd's own gRPC port with the server certificate, which
            # --client-cert-auth then checks as a client certificate: it needs both usages
            issued = ca.issue(name, ips=svc.ips, server=True, client=name == "etcd")
            _write(issued, svc.server)
        if svc.client is not None:
            _write(ca.issue(f"{deployment}/{name}", client=True), svc.client)
    return ca


def _write(issued: IssuedCert, files: CertFiles) -> None:
    cert = Path(files.cert)
    issued.write(cert.parent, cert.stem)
