"""Enrollment: a joining node trades its join token for its own certificate, through etcd.

Why: the token is printed before anyone knows the address the joining node will advertise, and
its workers serve HTTPS on that address, so their server certificate has to be issued after
`dynkv join` starts. And the token's own client certificate expires with the token: the node
needs one that lasts (`NODE_CERT_DAYS`).

How (docs/multi-host.md#joining-hosts-join-token-join):
1. `dynkv join` makes a key pair on the node (the private key never leaves it), and PUTs an
   `EnrollRequest` (the token, the node name, the addresses, a CSR) at
   `/dynkv/<name>/join/requests/<token id>`, connecting with the token's client certificate.
2. The first host's enroller (`python -m dynkv.join.enroll`, a service of an advertised plan)
   watches that prefix, checks the token's MAC with the join key only it has, its expiry, that
   it was not used before and that the node name is free, signs the CSR with the deployment CA
   (server and client use, the node's addresses), and PUTs an `EnrollAnswer` at
   `/dynkv/<name>/join/answers/<token id>` (under a short lease), or the refusal with its reason.
3. The node checks that the certificate is signed by the CA the token pins and holds its own
   public key, and writes it (0600) into its state dir.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from dynkv.join.token import NODE_NAME, JoinToken, TokenError, verify

NODE_CERT_DAYS = 365
ANSWER_TTL_S = 300
_BACKDATE = datetime.timedelta(minutes=5)


def requests_prefix(deployment: str) -> str:
    return f"/dynkv/{deployment}/join/requests/"


def answer_key(deployment: str, token_id: str) -> str:
    return f"/dynkv/{deployment}/join/answers/{token_id}"


class EnrollRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    token: SecretStr  # the whole token: its MAC is the proof
    node: str = Field(pattern=NODE_NAME.pattern)
    ips: tuple[str, ...] = Field(min_length=1)
    csr_pem: str

    def to_wire(self) -> dict:
        return {**self.model_dump(mode="json"), "token": self.token.get_secret_value()}


class EnrollAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    cert_pem: str | None = None
    reason: str | None = None  # None: accepted
    cause: str = ""
    fix: str = ""


# ---- the node's side ----------------------------------------------------------------------------


def new_key_and_csr(node: str, ips: Sequence[str]) -> tuple[bytes, str]:
    """(private key PEM, CSR PEM) for the node: EC P-256, its addresses as IP SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dynkv node {node}")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def check_issued(cert_pem: str, key_pem: bytes, token: JoinToken) -> None:
    """ValueError unless `cert_pem` is signed by the token's CA and holds our public key (an
    answer another holder of a deployment certificate wrote is not taken)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    ca = x509.load_pem_x509_certificate(token.ca_cert_pem.encode("ascii"))
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError("the certificate does not hold this node's key")


# ---- the first host's side ----------------------------------------------------------------------


def load_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The deployment CA's certificate and key, as `dynkv.tls.ca.DeploymentCA.ensure` wrote them
    (the load checks the key file is private)."""
    from dynkv.tls.ca import CA_CERT_FILE, CA_KEY_FILE, DeploymentCA

    DeploymentCA.load(tls_dir)  # CAError when missing or readable by others
    cert = x509.load_pem_x509_certificate((tls_dir / CA_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((tls_dir / CA_KEY_FILE).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def sign_csr(
    csr_pem: str,
    node: str,
    ips: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int = NODE_CERT_DAYS,
) -> str:
    """The node's certificate: its CSR's key, server + client use, exactly `ips` (not what the CSR
    asks for), at most as long as the CA lives."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    if not csr.is_signature_valid:
        raise ValueError("the CSR's signature is not valid")
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    return leaf_cert(
        csr.public_key(), f"dynkv node {node}", (ca_cert, ca_key), not_after=not_after, ips=ips
    )


def leaf_cert(
    public_key,
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    not_after: datetime.datetime,
    ips: Sequence[str] = (),
) -> str:
    """A certificate for `public_key`, signed by `ca`, valid until `not_after` (at most as long
    as the CA): server and client use with `ips`, client use only without."""
    ca_cert, ca_key = ca
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if ips:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if ips:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def answer(
    raw: object,
    token_id: str,
    *,
    deployment: str,
    join_key: bytes | None,
    mark_used,
    node_taken,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    now: float | None = None,
) -> EnrollAnswer:
    """The first host's answer to one request (pure but for `mark_used(token_id) -> bool` and
    `node_taken(node) -> bool`)."""
    try:
        req = EnrollRequest.model_validate(raw)
    except ValidationError as exc:
        return EnrollAnswer(
            reason="malformed",
            cause=f"the enrollment request is malformed ({exc.errors()[0]['msg']})",
            fix="run `dynkv join` with the same dynkv version as the first host",
        )
    if join_key is None:
        return EnrollAnswer(
            reason="tampered",
            cause=f"deployment {deployment!r} never printed a join token (no join key)",
            fix="run `dynkv join-token` on the first host and join with that token",
        )
    try:
        token = verify(
            req.token.get_secret_value(), join_key, now=time.time() if now is None else now,
            deployment=deployment,
        )  # fmt: skip
    except TokenError as exc:
        return EnrollAnswer(reason=exc.reason, cause=exc.cause, fix=exc.fix)
    if token.token_id != token_id:
        return EnrollAnswer(
            reason="tampered",
            cause="the enrollment request was filed under another token's id",
            fix="run `dynkv join` again",
        )
    if token.node is not None and token.node != req.node:
        return EnrollAnswer(
            reason="wrong_node",
            cause=f"this token was printed for node {token.node!r}, not {req.node!r}",
            fix=f"join with --node {token.node}, or print a token without --node",
        )
    if node_taken(req.node):
        return EnrollAnswer(
            reason="node_taken",
            cause=f"a node named {req.node!r} is already part of deployment {deployment!r}",
            fix="join with another --node name, or `dynkv down` on that node first",
        )
    if not mark_used(token.token_id):
        return EnrollAnswer(
            reason="used",
            cause="this join token was used already (a token joins one node)",
            fix="run `dynkv join-token` on the first host for a new token",
        )
    try:
        cert = sign_csr(req.csr_pem, req.node, req.ips, *ca)
    except ValueError as exc:
        return EnrollAnswer(
            reason="malformed",
            cause=f"the node's certificate request was refused ({exc})",
            fix="run `dynkv join` again",
        )
    return EnrollAnswer(cert_pem=cert)
