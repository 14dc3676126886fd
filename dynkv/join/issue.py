"""`dynkv join-token`'s core: a new `JoinToken` for an advertised deployment, encoded.

The token's client certificate is a bootstrap credential: client use only, no address, and it
expires with the token (to the second), so a token that leaks stops opening etcd and NATS when it
expires. Why a certificate in the token rather than only a one-time secret: etcd and NATS accept
no other credential from another host (client-certificate auth), and the node needs some way in
to ask for its own certificate (`dynkv.join.enroll`); a one-time secret would need a separate
enrollment endpoint on the first host, with its own port and its own TLS. The token id makes the
enrollment one-time instead.
"""

from __future__ import annotations

import datetime
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from dynkv.join.enroll import leaf_cert, load_ca
from dynkv.join.keys import join_key
from dynkv.join.token import JoinToken, encode
from dynkv.tls.ca import fingerprint_of


def new_token(
    *,
    deployment: str,
    deployment_dir: Path,
    tls_dir: Path,
    etcd_endpoints: tuple[str, ...],
    nats_url: str,
    frontend_url: str,
    registration_secret: str,
    nats_token: str,
    ttl_s: int,
    node: str | None = None,
    topology: str | None = None,
    disagg_transfer: str | None = None,
    now: float | None = None,
) -> tuple[JoinToken, str]:
    """(the token, its text). Makes the deployment's join key on first use (0600)."""
    issued = int(time.time() if now is None else now)
    expires = issued + ttl_s
    ca_cert, ca_key = load_ca(tls_dir)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    token_id = secrets.token_hex(8)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf_cert(
        key.public_key(),
        f"dynkv join {token_id}",
        (ca_cert, ca_key),
        not_after=datetime.datetime.fromtimestamp(expires, datetime.UTC),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    token = JoinToken(
        deployment=deployment,
        token_id=token_id,
        node=node,
        etcd_endpoints=etcd_endpoints,
        nats_url=nats_url,
        frontend_url=frontend_url,
        topology=topology,  # type: ignore[arg-type]
        disagg_transfer=disagg_transfer,  # type: ignore[arg-type]
        ca_cert_pem=ca_pem.decode("ascii"),
        ca_fingerprint=fingerprint_of(ca_pem),
        client_cert_pem=cert,
        client_key_pem=SecretStr(key_pem),
        registration_secret=SecretStr(registration_secret),
        nats_token=SecretStr(nats_token),
        issued_at=issued,
        expires_at=expires,
    )
    mac_key = join_key(deployment_dir, create=True)
    assert mac_key is not None
    return token, encode(token, mac_key)
