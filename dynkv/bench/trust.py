"""Which CA the bench's HTTP clients verify an https frontend against.

A deployment started with `dynkv up --advertise ADDR` serves its frontend over https with a
certificate from its own CA (docs/multi-host.md), which no system trust store knows. The bench
therefore trusts, in this order: the CA file the user names (`--ca-cert`, else
`$DYNKV_CLIENT_CA`: the variable every client of a deployment reads, `dynkv.tls.model`), else the
CA of the deployment it found (`--name`, or the local deployment whose frontend serves `--url`;
its frontend's `ca_cert` in the state), else the system's store. Verification is never turned
off. Everything that talks to the frontend uses the same trust: the model lookup, the workload,
the router comparison's /metrics reads. The report records the CA file's path and where it came
from (`record`), never key material.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dynkv.errors import CauseFix
from dynkv.tls.model import CA_ENV, ClientTLS

OPTION = "--ca-cert"


class TrustError(CauseFix):
    """A CA file that cannot be used (a usage error: cause + fix)."""


@dataclass(frozen=True)
class Trust:
    """A CA (and, from the environment, a client certificate) and where it came from: `--ca-cert`,
    `DYNKV_CLIENT_CA` or `deployment NAME`."""

    tls: ClientTLS
    source: str

    def verify(self) -> ssl.SSLContext:
        """httpx's `verify`: this CA only (not the system's store)."""
        return self.tls.ssl_context()

    def record(self) -> dict[str, str]:
        """What a report's config says about it: the path, never a key."""
        return {"ca_cert": self.tls.ca, "ca_cert_from": self.source}


def verify_of(trust: Trust | None) -> ssl.SSLContext | bool:
    return True if trust is None else trust.verify()


def checked(trust: Trust) -> Trust:
    """`trust`, once its files load; TrustError (cause + fix) otherwise."""
    try:
        trust.verify()
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise TrustError(
            f"{trust.source} {trust.tls.ca!r} cannot be used as a CA certificate: {reason}",
            f"pass {OPTION} with the deployment's CA (<state dir>/<name>/tls/ca.crt, PEM)",
        ) from None
    return trust


def choose(
    ca_cert: Path | None,
    environ: Mapping[str, str],
    *,
    deployment_ca: str | None = None,
    deployment: str | None = None,
) -> Trust | None:
    """The trust of a bench run: `--ca-cert`, else `$DYNKV_CLIENT_CA` (with the client
    certificate `$DYNKV_CLIENT_CERT`/`_KEY` when set), else the found deployment's CA; None:
    the system's store. TrustError for a CA file that does not load."""
    if ca_cert is not None:
        return checked(Trust(ClientTLS(ca=str(ca_cert)), OPTION))
    from_env = ClientTLS.from_env(environ)
    if from_env is not None:
        return checked(Trust(from_env, CA_ENV))
    if deployment_ca:
        return checked(Trust(ClientTLS(ca=deployment_ca), f"deployment {deployment or '?'}"))
    return None
