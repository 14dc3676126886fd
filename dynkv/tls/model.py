"""What an advertised deployment's plan says about transport security: which files, never secrets.

`TransportSecurity` is pure data the plan builder fills in (`dynkv up --advertise ADDR`): the
address other hosts reach, the CA certificate, and for each service the server and/or client
certificate it uses. Nothing here is made at plan time, so `up --dry-run` writes nothing: the
supervisor makes the CA and issues the listed certificates just before it starts the services
(`dynkv.tls.issue.materialize`). The NATS token travels by the environment variable named in
`nats_token_env` (docs/security.md "Secrets off the command line"); the plan records the name only.

Processes read their side from the environment (`client_env`/`server_env`), because `dynkv/kvbm`
runs inside vLLM and imports nothing else from dynkv: the variable names below are the contract.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict

# The environment a TLS client of the deployment reads (etcd, NATS, workers' HTTP).
CA_ENV = "DYNKV_CLIENT_CA"
CERT_ENV = "DYNKV_CLIENT_CERT"
KEY_ENV = "DYNKV_CLIENT_KEY"
NATS_TOKEN_ENV = "DYNKV_NATS_TOKEN"

TLS_DIR = "tls"  # under the deployment dir


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def replace(self, **changes: Any) -> Self:
        return self.model_validate({**dict(self), **changes})


class CertFiles(_Frozen):
    """A certificate and its key, PEM files (both 0600)."""

    cert: str
    key: str


class ClientTLS(_Frozen):
    """How a client of the deployment verifies its servers (`ca`) and proves who it is (`cert`,
    `key`: etcd requires it; NATS and the workers take the TLS alone)."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the deployment's CA (not the system's)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClientTLS | None:
        """The client side a process was given (`DYNKV_CLIENT_*`); None: a loopback deployment."""
        ca = environ.get(CA_ENV)
        if not ca:
            return None
        return cls(ca=ca, cert=environ.get(CERT_ENV) or None, key=environ.get(KEY_ENV) or None)

    def env(self) -> dict[str, str]:
        env = {CA_ENV: self.ca}
        if self.cert and self.key:
            env |= {CERT_ENV: self.cert, KEY_ENV: self.key}
        return env


class ServiceTLS(_Frozen):
    """One service's certificates: `server` for what it listens on (SANs `ips`), `client` for
    what it connects to (etcd, NATS, workers)."""

    server: CertFiles | None = None
    client: CertFiles | None = None
    ips: tuple[str, ...] = ()


class TransportSecurity(_Frozen):
    """Transport security of a deployment other hosts reach. `services` is keyed by the plan's
    service names, plus `cli` for dynkv's own commands (`status`, `down`, `logs`, `bench`)."""

    advertise: str
    dir: str
    ca_cert: str
    ca_key: str
    nats_token_env: str = NATS_TOKEN_ENV
    services: dict[str, ServiceTLS]

    def service(self, name: str) -> ServiceTLS:
        return self.services[name]

    def client(self, name: str) -> ClientTLS:
        """Service `name`'s client side: the CA, and its client certificate when it has one."""
        files = self.services[name].client
        if files is None:
            return ClientTLS(ca=self.ca_cert)
        return ClientTLS(ca=self.ca_cert, cert=files.cert, key=files.key)

    def client_env(self, name: str, *, token: str | None = None) -> dict[str, str]:
        """What service `name` needs in its environment to be a client of the deployment (with
        `token`, the NATS token under `nats_token_env`)."""
        env = self.client(name).env()
        if token is not None:
            env[self.nats_token_env] = token
        return env

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
