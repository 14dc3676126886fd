"""The per-deployment CA of `up --advertise` (dynkv.tls.ca): what it issues verifies against it,
its fingerprint pins it, and its files are private (docs/multi-host.md)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from dynkv.tls.ca import CAError, DeploymentCA, fingerprint_of


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_made_once_private_and_loaded_back_the_same(tmp_path):
    directory = tmp_path / "state" / "tls"
    ca = DeploymentCA.ensure(directory, "prod")
    assert mode(directory) == 0o700
    assert {p.name: mode(p) for p in directory.iterdir()} == {"ca.crt": 0o600, "ca.key": 0o600}
    again = DeploymentCA.ensure(directory, "prod")
    loaded = DeploymentCA.load(directory)
    assert again.fingerprint == loaded.fingerprint == ca.fingerprint
    assert again.cert_pem == ca.cert_pem
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "prod" in cert.subject.rfc4514_string()


def test_fingerprint_is_the_sha256_of_the_der(tmp_path):
    ca = DeploymentCA.ensure(tmp_path / "tls", "d")
    der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert fingerprint_of(ca.cert_pem) == ca.fingerprint
    other = DeploymentCA.ensure(tmp_path / "other", "d")
    assert other.fingerprint != ca.fingerprint  # a new deployment, a new CA


def test_issued_certificates_chain_to_the_ca_with_their_names_and_usages(tmp_path):
    ca = DeploymentCA.ensure(tmp_path / "tls", "d")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    server = ca.issue("etcd", ips=["127.0.0.2", "127.0.0.1"], dns=["node-a"], server=True)
    client = ca.issue("d/cli", client=True, days=7)
    for issued, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        cert.verify_directly_issued_by(ca_cert)  # raises when the signature is not the CA's
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [usage]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = (
        x509.load_pem_x509_certificate(server.cert_pem)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.2"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["node-a"]
    short = x509.load_pem_x509_certificate(client.cert_pem)
    assert (short.not_valid_after_utc - short.not_valid_before_utc).days <= 7
    # a certificate from another CA does not verify against this one
    foreign = DeploymentCA.ensure(tmp_path / "x", "x").issue("etcd", ips=["127.0.0.1"], server=True)
    with pytest.raises(Exception):  # noqa: B017 (cryptography raises InvalidSignature/ValueError)
        x509.load_pem_x509_certificate(foreign.cert_pem).verify_directly_issued_by(ca_cert)


def test_written_certificates_are_0600_and_the_key_matches(tmp_path):
    ca = DeploymentCA.ensure(tmp_path / "tls", "d")
    issued = ca.issue("worker", ips=["127.0.0.1"], server=True, client=True)
    cert_path, key_path = issued.write(tmp_path / "tls", "worker")
    assert (cert_path.name, key_path.name) == ("worker.crt", "worker.key")
    assert mode(cert_path) == mode(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_a_ca_key_other_users_can_read_is_refused(tmp_path):
    DeploymentCA.ensure(tmp_path / "tls", "d")
    (tmp_path / "tls" / "ca.key").chmod(0o644)
    with pytest.raises(CAError, match="readable by other users"):
        DeploymentCA.load(tmp_path / "tls")
    with pytest.raises(CAError, match="no deployment CA"):
        DeploymentCA.load(tmp_path / "nothing")


def test_a_certificate_is_for_something(tmp_path):
    ca = DeploymentCA.ensure(tmp_path / "tls", "d")
    with pytest.raises(ValueError):
        ca.issue("nobody")
    with pytest.raises(ValueError):
        ca.issue("nameless", server=True)  # a server certificate names where it serves
