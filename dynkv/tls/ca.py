"""The per-deployment certificate authority of an advertised deployment (docs/multi-host.md).

`dynkv up --advertise` makes one CA per deployment (EC P-256, ten years) and issues from it the
server certificates of etcd, NATS, the frontend and the workers and the client certificates of
dynkv's own clients. Everything lives in one 0700 directory of the deployment's state dir, each
file 0600, and is made once: a later `up` loads the same CA, so certificates already handed to
joined hosts keep verifying. A directory other users could read is refused, not reused.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CA_DAYS = 3650
# Certificates start a little in the past: hosts whose clocks differ by minutes still agree.
_BACKDATE = datetime.timedelta(minutes=5)


class CAError(RuntimeError):
    """The CA directory cannot be used (missing, unreadable, or readable by other users)."""


def fingerprint_of(cert_pem: bytes) -> str:
    """`sha256:<hex>` of a certificate's DER: what a join token pins the CA by."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` as 0600 from the first byte (never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise CAError(f"{directory} is not a directory of ours")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        directory.chmod(0o700)


def _check_private_file(path: Path) -> None:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise CAError(f"{path} is not a file of ours")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CAError(f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o})")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a leaf's EC key signs and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """(`<stem>.crt`, `<stem>.key`) in `directory` (made 0700), both 0600."""
        _private_dir(directory)
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        _write_private(key_path, self.key_pem)
        _write_private(cert_path, self.cert_pem)
        return cert_path, key_path


class DeploymentCA:
    """One deployment's CA: its certificate (public, pinned by fingerprint) and its signing key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self._cert = cert
        self._key = key
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self.fingerprint: str = fingerprint_of(self.cert_pem)

    @classmethod
    def ensure(cls, tls_dir: Path, deployment: str) -> DeploymentCA:
        """The CA in `tls_dir`, made there first when there is none."""
        _private_dir(tls_dir)
        if (tls_dir / CA_CERT_FILE).exists() or (tls_dir / CA_KEY_FILE).exists():
            return cls.load(tls_dir)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dynkv"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"dynkv CA {deployment}"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        # The key first: a crash in between leaves no certificate whose key is missing.
        _write_private(tls_dir / CA_KEY_FILE, _key_pem(key))
        _write_private(tls_dir / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key)

    @classmethod
    def load(cls, tls_dir: Path) -> DeploymentCA:
        """The CA made earlier in `tls_dir`; CAError when it is missing or not private."""
        cert_path, key_path = tls_dir / CA_CERT_FILE, tls_dir / CA_KEY_FILE
        try:
            _check_private_file(key_path)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise CAError(
                f"no deployment CA in {tls_dir} ({Path(exc.filename).name} missing)"
            ) from exc
        except ValueError as exc:
            raise CAError(f"the deployment CA in {tls_dir} is unreadable: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"the deployment CA key in {tls_dir} is not an EC key")
        return cls(cert, key)

    def issue(
        self,
        name: str,
        *,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
        days: int = 365,
    ) -> IssuedCert:
        """A leaf certificate for `name`, valid for `ips`/`dns` (server) and/or as a client."""
        if not (server or client):
            raise ValueError("a certificate is for a server, a client, or both")
        if server and not (ips or dns):
            raise ValueError("a server certificate names at least one address or DNS name")
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(
                min(now + datetime.timedelta(days=days), self._cert.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(d) for d in dns]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
