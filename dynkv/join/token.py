"""The join token: everything a second host needs to join a deployment, in one string.

`dynkv join-token` (on the first host) prints `dynkv1.<payload>.<mac>`:
- `payload` is base64url(zlib(JSON of `JoinToken`)): the endpoints, the deployment CA's
  certificate and fingerprint, a client certificate and key issued by that CA for this token
  (valid until the token expires), the registration-signing secret, the NATS token, the expiry.
- `mac` is base64url(HMAC-SHA256(join key, "dynkv1." + payload)). The join key
  (`<state dir>/<name>/join/join.key`, 0600) never leaves the first host.

Who can check what (docs/multi-host.md#joining-hosts-join-token-join):
- The joiner cannot check the MAC (it has no join key; giving it one would let every joined node
  mint tokens). It checks the format, the version, the expiry on its own clock, that the CA
  certificate carried has the fingerprint carried, and then every TLS connection it makes
  against that CA only: a token whose endpoints were changed to someone else's fails the
  handshake. It trusts the token as far as it trusts the channel that brought it (like
  `kubeadm join` with `--discovery-token-ca-cert-hash`).
- The first host checks the MAC, the expiry and that the token was not used before when the
  joiner presents it (`dynkv.join.enroll`, which then issues the node's own certificate for the
  address it advertises): a tampered, expired or replayed token is refused there, and the joiner
  shows that reason.

The token is a secret (it carries the deployment secret and a client key): printed once to
stdout, never logged; the model keeps its secret fields as `SecretStr`, so a repr or a log line
of it shows `**********`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

PREFIX = "dynkv1"
_MAC_CONTEXT = b"dynkv join token v1\x00"
MAX_TOKEN_CHARS = 64 * 1024  # a real one is ~3 KB; anything far larger is not ours
_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 365 * 86400
# a node's name: in worker ids (`<node>-agg-0`), NATS subjects and pool directories
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class TokenError(Exception):
    """A token that cannot be used: `reason` (malformed, version, expired, tampered,
    wrong_deployment, used) for tests and logs, `cause` and `fix` for the user (exit 2)."""

    def __init__(self, reason: str, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.reason, self.cause, self.fix = reason, cause, fix


class JoinToken(BaseModel):
    """What a joining host receives. Defined once: `join-token` writes it, `join` reads it, the
    first host's enroller verifies it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    deployment: str = Field(min_length=1, description="the first host's deployment name")
    token_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="one-time id (enrollment)")
    node: str | None = Field(None, description="node name chosen by join-token --node")
    etcd_endpoints: tuple[str, ...] = Field(min_length=1, description="https:// etcd URLs")
    nats_url: str = Field(min_length=1, description="tls:// NATS URL")
    frontend_url: str = Field(min_length=1, description="the first host's frontend")
    # what the first host's frontend serves (placement rules); None: it runs no workers yet
    topology: Literal["agg", "disagg"] | None = None
    disagg_transfer: Literal["handoff", "nixl"] | None = None
    ca_cert_pem: str = Field(min_length=1, description="the deployment CA (public)")
    ca_fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    client_cert_pem: str = Field(min_length=1, description="issued for this token")
    client_key_pem: SecretStr
    registration_secret: SecretStr  # signs worker registrations (docs/security.md)
    nats_token: SecretStr
    issued_at: int
    expires_at: int

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def plain(self) -> dict[str, Any]:
        """The fields with secrets revealed: what is encoded, and nothing else sees it."""
        data = self.model_dump(mode="json")
        for name in ("client_key_pem", "registration_secret", "nats_token"):
            data[name] = getattr(self, name).get_secret_value()
        return data


# ---- encoding ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed_part: str) -> str:
    return _b64(hmac.new(key, _MAC_CONTEXT + signed_part.encode("ascii"), hashlib.sha256).digest())


def encode(token: JoinToken, key: bytes) -> str:
    body = json.dumps(token.plain(), separators=(",", ":"), sort_keys=True).encode("utf-8")
    payload = _b64(zlib.compress(body, 9))
    signed_part = f"{PREFIX}.{payload}"
    return f"{signed_part}.{_mac(key, signed_part)}"


_MALFORMED_FIX = (
    "copy the whole token printed by `dynkv join-token` on the first host (one line, no spaces), "
    "or print a new one there"
)
_NEW_TOKEN_FIX = "run `dynkv join-token` on the first host for a new token, and join with it"


def _parts(text: str) -> tuple[str, str, str]:
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError(
            "malformed", "this is not a dynkv join token (far too long)", _MALFORMED_FIX
        )
    parts = text.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenError(
            "malformed",
            "this is not a dynkv join token (expected dynkv1.<payload>.<mac>)",
            _MALFORMED_FIX,
        )
    if parts[0] != PREFIX:
        if re.fullmatch(r"dynkv\d+", parts[0]):
            raise TokenError(
                "version",
                f"this token is version {parts[0]!r}, and this dynkv reads {PREFIX!r}",
                "run the same dynkv version on both hosts (pip install -U dynkv), or print the "
                "token with this host's version",
            )
        raise TokenError("malformed", "this is not a dynkv join token", _MALFORMED_FIX)
    return parts[0], parts[1], parts[2]


def decode(text: str, *, now: float | None = None, deployment: str | None = None) -> JoinToken:
    """The joiner's read of a token: format, version, fields, CA fingerprint, expiry and (when
    given) the deployment it is for. The MAC is not checked here (see module doc):
    `verify` does that on the first host."""
    _, payload, _ = _parts(text)
    try:
        raw = zlib.decompress(_unb64(payload), bufsize=MAX_TOKEN_CHARS)
        data = json.loads(raw)
        token = JoinToken.model_validate(data)
    except (binascii.Error, ValueError, zlib.error, ValidationError, TypeError):
        # ValidationError is a ValueError; either way the payload is damaged or not ours
        raise TokenError(
            "malformed", "the join token is damaged (its payload does not decode)", _MALFORMED_FIX
        ) from None
    if fingerprint_of_pem(token.ca_cert_pem) != token.ca_fingerprint:
        raise TokenError(
            "tampered",
            "the join token's CA certificate does not match the fingerprint it carries",
            _NEW_TOKEN_FIX,
        )
    if deployment is not None and token.deployment != deployment:
        raise TokenError(
            "wrong_deployment",
            f"the join token is for deployment {token.deployment!r}, not {deployment!r}",
            f"join with --name {token.deployment} (or without --name), or print a token for "
            f"{deployment!r} with `dynkv join-token --name {deployment}`",
        )
    if token.expired(now):
        ago = _human((time.time() if now is None else now) - token.expires_at)
        raise TokenError("expired", f"the join token expired {ago} ago", _NEW_TOKEN_FIX)
    return token


def verify(text: str, key: bytes, *, now: float | None = None, deployment: str) -> JoinToken:
    """The first host's check: everything `decode` checks, and the MAC with the join key."""
    _, payload, mac = _parts(text)
    if not hmac.compare_digest(mac.encode("ascii"), _mac(key, f"{PREFIX}.{payload}").encode()):
        raise TokenError(
            "tampered",
            "the join token was not issued by this deployment, or was changed after it was "
            "printed (its MAC does not match)",
            _NEW_TOKEN_FIX,
        )
    return decode(text, now=now, deployment=deployment)


def fingerprint_of_pem(cert_pem: str) -> str:
    """ "sha256:" + hex of the certificate's DER, the form `DeploymentCA.fingerprint` uses;
    "" for text that is not one PEM certificate."""
    match = re.search(
        r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", cert_pem, re.DOTALL
    )
    if not match:
        return ""
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return ""
    return "sha256:" + hashlib.sha256(der).hexdigest()


# ---- TTL --------------------------------------------------------------------------------------


def parse_ttl(text: str) -> int:
    """`24h`, `30m`, `7d`, `90s` or plain seconds → seconds (1 s to 365 d); ValueError else."""
    match = _TTL.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use 30m, 24h, 7d)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not 1 <= seconds <= MAX_TTL_S:
        raise ValueError(f"{text!r} is outside 1s–365d")
    return seconds


def _human(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
