"""Enrollment on the first host: a valid token buys one node certificate, for the node's own key
and addresses; a tampered, expired, replayed or misdirected one buys a refusal with its reason."""

from __future__ import annotations

import pytest
from cryptography import x509
from join_support import NOW, first_host_dir, make

from dynkv.join.enroll import answer, check_issued, load_ca, new_key_and_csr
from dynkv.join.keys import join_key, mark_used
from dynkv.join.token import decode


@pytest.fixture
def first_host(tmp_path):
    return first_host_dir(tmp_path)


def request(text, node="hostb", ips=("127.0.0.2",)):
    key_pem, csr = new_key_and_csr(node, ips)
    return key_pem, {"token": text, "node": node, "ips": list(ips), "csr_pem": csr}


def ask(ddir, raw, token_id, *, now=NOW + 5, taken=()):
    return answer(
        raw,
        token_id,
        deployment="default",
        join_key=join_key(ddir, create=False),
        mark_used=lambda tid: mark_used(ddir, tid),
        node_taken=lambda node: node in taken,
        ca=load_ca(ddir / "tls"),
        now=now,
    )


def test_a_valid_token_buys_a_node_certificate(first_host):
    token, text = make(first_host)
    key_pem, raw = request(text)
    got = ask(first_host, raw, token.token_id)
    assert got.reason is None and got.cert_pem
    check_issued(got.cert_pem, key_pem, decode(text, now=NOW))
    cert = x509.load_pem_x509_certificate(got.cert_pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]


def test_a_token_joins_one_node(first_host):
    token, text = make(first_host)
    assert ask(first_host, request(text)[1], token.token_id).reason is None
    again = ask(first_host, request(text, node="hostc")[1], token.token_id)
    assert again.reason == "used" and "join-token" in again.fix


def test_expired_and_tampered_tokens_are_refused(first_host):
    token, text = make(first_host, ttl=60)
    assert ask(first_host, request(text)[1], token.token_id, now=NOW + 120).reason == "expired"
    prefix, payload, mac = text.split(".")
    bad = f"{prefix}.{payload}.{'A' * len(mac)}"
    assert ask(first_host, request(bad)[1], token.token_id).reason == "tampered"
    assert ask(first_host, request(text)[1], "0" * 16).reason == "tampered"


def test_node_name_taken_or_not_the_one_printed(first_host):
    token, text = make(first_host)
    got = ask(first_host, request(text)[1], token.token_id, taken={"hostb"})
    assert got.reason == "node_taken" and "--node" in got.fix
    token, text = make(first_host, node="gpu1")
    assert ask(first_host, request(text)[1], token.token_id).reason == "wrong_node"


def test_malformed_request(first_host):
    token, text = make(first_host)
    assert ask(first_host, {"token": text}, token.token_id).reason == "malformed"
    _, raw = request(text)
    raw["node"] = "Bad Name!"
    assert ask(first_host, raw, token.token_id).reason == "malformed"


def test_a_certificate_for_another_key_is_not_taken(first_host):
    token, text = make(first_host)
    _, raw = request(text)
    got = ask(first_host, raw, token.token_id)
    other_key, _ = new_key_and_csr("hostb", ("127.0.0.2",))
    with pytest.raises(ValueError):
        check_issued(got.cert_pem, other_key, decode(text, now=NOW))
