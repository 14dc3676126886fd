"""The join token: round trip, and every way a token is refused (with its reason)."""

from __future__ import annotations

import base64
import json
import os
import stat
import zlib

import pytest
from join_support import NOW, first_host_dir, make

from dynkv.join.keys import join_key
from dynkv.join.token import TokenError, decode, encode, parse_ttl, verify
from dynkv.tls.ca import DeploymentCA


@pytest.fixture
def first_host(tmp_path):
    return first_host_dir(tmp_path)


def test_round_trip_keeps_every_field(first_host):
    token, text = make(first_host)
    assert text.startswith("dynkv1.") and text.count(".") == 2 and "\n" not in text
    key = join_key(first_host, create=False)
    assert verify(text, key, now=NOW + 10, deployment="default") == token
    got = decode(text, now=NOW + 10)
    assert got.plain() == token.plain()
    assert got.registration_secret.get_secret_value() == "s" * 64
    assert got.expires_at == NOW + 3600


def test_secrets_do_not_show_in_repr(first_host):
    token, _ = make(first_host)
    shown = repr(token) + str(token)
    for secret in ("s" * 64, "n" * 32, "PRIVATE KEY"):
        assert secret not in shown


def test_join_key_is_private(first_host):
    make(first_host)
    path = first_host / "join" / "join.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((first_host / "join").stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()


def test_expired_token_is_refused_with_how_long_ago(first_host):
    _, text = make(first_host, ttl=60)
    with pytest.raises(TokenError) as info:
        decode(text, now=NOW + 3 * 3600)
    assert info.value.reason == "expired"
    assert "expired 2h" in info.value.cause and "join-token" in info.value.fix


def test_tampered_payload_is_refused_by_the_first_host(first_host):
    _, text = make(first_host)
    prefix, payload, mac = text.split(".")
    data = json.loads(zlib.decompress(base64.urlsafe_b64decode(payload + "==")))
    data["expires_at"] += 86400 * 365  # a longer life
    forged = base64.urlsafe_b64encode(zlib.compress(json.dumps(data).encode())).rstrip(b"=")
    forged_text = f"{prefix}.{forged.decode()}.{mac}"
    decode(forged_text, now=NOW)  # the joiner cannot tell (no join key)...
    with pytest.raises(TokenError) as info:  # ...the first host can
        verify(forged_text, join_key(first_host, create=False), now=NOW, deployment="default")
    assert info.value.reason == "tampered" and "MAC" in info.value.cause


def test_token_of_another_deployment_is_refused(first_host, tmp_path):
    _, text = make(first_host)
    with pytest.raises(TokenError) as info:
        decode(text, now=NOW, deployment="prod")
    assert info.value.reason == "wrong_deployment"
    assert "'default'" in info.value.cause and "--name default" in info.value.fix
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    with pytest.raises(TokenError) as info:  # another deployment's key: not ours
        verify(text, join_key(other, create=True), now=NOW, deployment="default")
    assert info.value.reason == "tampered"


def test_swapped_ca_is_refused_by_the_joiner(first_host, tmp_path):
    token, _ = make(first_host)
    other = DeploymentCA.ensure(tmp_path / "evil", "evil")
    forged = token.model_copy(update={"ca_cert_pem": other.cert_pem.decode()})
    with pytest.raises(TokenError) as info:
        decode(encode(forged, b"k" * 32), now=NOW)
    assert info.value.reason == "tampered" and "fingerprint" in info.value.cause


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "dynkv1.abc",
        "dynkv1..mac",
        "dynkv1.!!!!.mac",
        "dynkv1." + base64.urlsafe_b64encode(zlib.compress(b"[1,2]")).decode() + ".mac",
        "dynkv1." + base64.urlsafe_b64encode(b"not zlib").decode() + ".mac",
        "x" * 70_000,
        "kubeadm.abc.def",
    ],
)
def test_malformed_tokens_are_refused(text):
    with pytest.raises(TokenError) as info:
        decode(text, now=NOW)
    assert info.value.reason == "malformed"
    assert info.value.cause and "join-token" in info.value.fix


def test_other_version_is_named():
    with pytest.raises(TokenError) as info:
        decode("dynkv2.abc.def", now=NOW)
    assert info.value.reason == "version" and "dynkv2" in info.value.cause


def test_bootstrap_certificate_expires_with_the_token(first_host):
    from cryptography import x509

    token, _ = make(first_host, ttl=7200, now=None)
    cert = x509.load_pem_x509_certificate(token.client_cert_pem.encode())
    assert int(cert.not_valid_after_utc.timestamp()) == token.expires_at
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u.dotted_string for u in eku] == ["1.3.6.1.5.5.7.3.2"]  # client auth only
    ca = x509.load_pem_x509_certificate(token.ca_cert_pem.encode())
    cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("30m", 1800), ("7d", 604800), ("90", 90), ("90s", 90)]
)
def test_ttl(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1y", "-1h", "400d", "h"])
def test_bad_ttl(text):
    with pytest.raises(ValueError):
        parse_ttl(text)
