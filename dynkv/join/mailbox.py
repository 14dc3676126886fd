"""Enrollment over etcd (`dynkv.join.enroll` has the rules): the joining node's request and wait,
and the first host's enroller loop (`python -m dynkv.join.mailbox`, the `enroll` service of an
advertised plan).

The joining node connects with the token's bootstrap certificate; its key and the node's own key
are written 0600 into the node's `tls/` dir (the bootstrap pair is removed once the node has its
own certificate). The request carries a lease of `ANSWER_TTL_S`, so an abandoned one vanishes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dynkv.infra.etcd_client import EtcdClient, EtcdError
from dynkv.join.cluster import registrations
from dynkv.join.enroll import (
    ANSWER_TTL_S,
    EnrollAnswer,
    EnrollRequest,
    answer,
    answer_key,
    check_issued,
    load_ca,
    new_key_and_csr,
    requests_prefix,
)
from dynkv.join.keys import join_key, mark_used, write_private
from dynkv.join.token import JoinToken
from dynkv.plan.enroll import ENROLL_ETCD_ENV
from dynkv.tls.ca import IssuedCert
from dynkv.tls.model import ClientTLS

ENROLL_WAIT_S = 30.0
POLL_S = 0.5


class EnrollFailed(Exception):
    """The node got no certificate: `reason` (the first host's, or `unreachable`), cause, fix."""

    def __init__(self, reason: str, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.reason, self.cause, self.fix = reason, cause, fix


def write_ca(tls_dir: Path, token: JoinToken) -> Path:
    """The CA certificate the token pins, as `tls/ca.crt` (0600, like every file there)."""
    path = tls_dir / "ca.crt"
    write_private(path, token.ca_cert_pem.encode("ascii"))
    return path


def enroll(
    token: JoinToken,
    token_text: str,
    *,
    node: str,
    ips: tuple[str, ...],
    tls_dir: Path,
    timeout: float = ENROLL_WAIT_S,
    check: Callable[[EtcdClient], None] | None = None,
) -> ClientTLS:
    """Ask the first host for this node's certificate; written as `tls/node.crt`/`node.key`.
    Returns the node's client side (CA + its certificate). EnrollFailed with the reason.
    `check(client)` runs first, connected with the bootstrap certificate (the placement rules
    read the deployment's registrations): what it raises stops the join before the token is
    spent."""
    ca = write_ca(tls_dir, token)
    boot_cert, boot_key = IssuedCert(
        token.client_cert_pem.encode("ascii"),
        token.client_key_pem.get_secret_value().encode("ascii"),
    ).write(tls_dir, "bootstrap")
    bootstrap = ClientTLS(ca=str(ca), cert=str(boot_cert), key=str(boot_key))
    key_pem, csr = new_key_and_csr(node, ips)
    request = EnrollRequest(token=token_text, node=node, ips=ips, csr_pem=csr)  # type: ignore[arg-type]
    try:
        with EtcdClient(token.etcd_endpoints, tls=bootstrap, timeout=5.0) as client:
            if check is not None:
                check(client)
            lease = client.lease_grant(ANSWER_TTL_S)
            client.put(
                requests_prefix(token.deployment) + token.token_id, request.to_wire(), lease=lease
            )
            got = _wait_answer(client, answer_key(token.deployment, token.token_id), timeout)
    except (EtcdError, OSError) as exc:
        raise EnrollFailed(
            "unreachable",
            f"cannot reach the first host's etcd at {', '.join(token.etcd_endpoints)} over TLS "
            f"({type(exc).__name__}: {exc})",
            "check that the first host runs `dynkv up --advertise` at that address and that this "
            "host can reach it, or print a new token there",
        ) from None
    finally:
        boot_cert.unlink(missing_ok=True)
        boot_key.unlink(missing_ok=True)
    if got is None:
        raise EnrollFailed(
            "no_answer",
            f"the first host did not answer the enrollment within {timeout:g} s",
            "check that the first host's deployment runs its `enroll` service (`dynkv status` "
            "there), then join again",
        )
    if got.reason is not None or not got.cert_pem:
        raise EnrollFailed(got.reason or "refused", got.cause, got.fix)
    try:
        check_issued(got.cert_pem, key_pem, token)
    except ValueError as exc:
        raise EnrollFailed(
            "bad_certificate",
            f"the certificate in the first host's answer is not for this node ({exc})",
            "join again with a new token",
        ) from None
    cert_path, key_path = IssuedCert(got.cert_pem.encode("ascii"), key_pem).write(tls_dir, "node")
    return ClientTLS(ca=str(ca), cert=str(cert_path), key=str(key_path))


def _wait_answer(client: EtcdClient, key: str, timeout: float) -> EnrollAnswer | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kv = client.get(key)
        if kv is not None:
            client.delete(key)
            return EnrollAnswer.model_validate_json(kv.value)
        time.sleep(POLL_S)
    return None


# ---- the first host's enroller ------------------------------------------------------------------


def serve_once(client: EtcdClient, deployment: str, deployment_dir: Path, tls_dir: Path) -> int:
    """Answer every pending request; returns how many were answered."""
    prefix = requests_prefix(deployment)
    pending = client.get_prefix(prefix).kvs
    if not pending:
        return 0
    ca = load_ca(tls_dir)
    key = join_key(deployment_dir, create=False)
    for kv in pending:
        nodes = set(registrations(client, deployment, None))
        token_id = kv.key[len(prefix) :]
        try:
            raw = kv.json()
        except ValueError:
            raw = None
        reply = answer(
            raw,
            token_id,
            deployment=deployment,
            join_key=key,
            mark_used=lambda tid: mark_used(deployment_dir, tid),
            node_taken=nodes.__contains__,
            ca=ca,
        )
        lease = client.lease_grant(ANSWER_TTL_S)
        client.put(answer_key(deployment, token_id), reply.model_dump(mode="json"), lease=lease)
        client.delete(kv.key)
        node = raw.get("node") if isinstance(raw, dict) else None
        verdict = "issued a certificate" if reply.reason is None else f"refused ({reply.reason})"
        _log(f"enrollment {token_id} for node {node!r}: {verdict}")
    return len(pending)


def _log(message: str) -> None:
    print(f"[dynkv.join] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynkv.join.mailbox")
    p.add_argument("--deployment", required=True)
    p.add_argument("--deployment-dir", required=True, type=Path)
    p.add_argument("--interval", type=float, default=POLL_S)
    args = p.parse_args(argv)
    endpoints = os.environ.get(ENROLL_ETCD_ENV, "")
    tls = ClientTLS.from_env(os.environ)
    client = EtcdClient(endpoints, tls=tls)
    tls_dir = args.deployment_dir / "tls"
    _log(f"answering join requests of {args.deployment} (docs/multi-host.md)")
    while True:
        try:
            serve_once(client, args.deployment, args.deployment_dir, tls_dir)
        except EtcdError as exc:
            _log(f"etcd not reachable ({exc}); retrying")
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
