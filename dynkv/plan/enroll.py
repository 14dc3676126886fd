"""The `enroll` service of an advertised deployment: answers the join requests of other hosts'
nodes (`dynkv.join.mailbox`; docs/multi-host.md#joining-hosts-join-token-join).

It runs on the first host only (it holds the CA key and the join key, both in the deployment's
state dir), talks to etcd with dynkv's own client certificate, and listens on no port.
"""

from __future__ import annotations

from pathlib import Path

from dynkv.plan.model import Service
from dynkv.tls.layout import CLI
from dynkv.tls.model import TransportSecurity

ENROLL = "enroll"
ENROLL_ETCD_ENV = "DYNKV_ENROLL_ETCD_ENDPOINTS"  # by environment: a URL may carry a password


def enroll_service(
    *,
    deployment: str,
    deployment_dir: Path,
    python: str,
    etcd_endpoints: tuple[str, ...],
    tls: TransportSecurity,
    env: dict[str, str],
    depends_on: tuple[str, ...],
) -> Service:
    return Service(
        name=ENROLL,
        role=ENROLL,
        argv=(
            python,
            "-m",
            "dynkv.join.mailbox",
            "--deployment",
            deployment,
            "--deployment-dir",
            str(deployment_dir),
        ),
        env={**env, ENROLL_ETCD_ENV: ",".join(etcd_endpoints), **tls.client_env(CLI)},
        cwd=str(deployment_dir),
        depends_on=depends_on,
        log_file=str(deployment_dir / "logs" / f"{ENROLL}.log"),
    )
