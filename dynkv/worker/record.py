"""The worker registration: its etcd key schema, its record, and the record's signature.

Defined once here and imported by the three parties of the seam: the worker wrapper writes it
(`dynkv.worker.registration`), the frontend reads it (`dynkv.frontend.pool`), the plan names the
key a worker's readiness probe waits for (`dynkv.plan.worker`). Pure (pydantic and the standard
library): the plan imports it and starts nothing.

Key `/dynkv/<deployment>/workers/<worker_id>` → JSON `{"id", "role", "url", "model",
"metrics_url", "pid", "started_at", "node", "signature"}`. Forward compatible: a reader ignores fields it
does not know, and the signature covers every field the writer wrote (not only those the reader
knows), so a newer worker's record still verifies on an older frontend.

Why signed: etcd on loopback has no authentication, so any local process could PUT a record
that sends prompts to itself. `dynkv up` gives the workers and the frontend a per-deployment
secret (`DEPLOYMENT_SECRET_ENV`, never argv); a record carries
`HMAC-SHA256(secret, canonical(key, record))`, and a frontend that has the secret ignores a record
without a valid one (docs/security.md). The key is inside the MAC, so a record cannot be replayed
under another worker id or another deployment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynkv.kvbm.roles import Role

SIGNATURE_FIELD = "signature"
# The per-deployment secret, in the environment of the worker wrappers and the frontend only.
DEPLOYMENT_SECRET_ENV = "DYNKV_DEPLOYMENT_SECRET"
_WORKER_KEY_CONTEXT = b"dynkv worker api key v1"


class BadRegistration(ValueError):
    """An etcd value under the workers prefix that is not a (valid, signed) worker record.
    `reason` is a short metric label: malformed, unsigned, bad_signature."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class WorkerRecord(BaseModel):
    """What a worker publishes about itself. Unknown fields are ignored (a newer writer)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str | None = Field(None, description="Worker id; the key's last segment when absent.")
    role: Role = Role.AGG
    url: str = Field(min_length=1, description="Base URL of the worker's vLLM server.")
    model: str = Field(min_length=1, description="Served model name.")
    metrics_url: str | None = None
    pid: int | None = None
    started_at: float | None = None
    # the host it runs on: None on the first host, the node name on a joined one
    # (docs/multi-host.md); `status` groups the deployment's workers by it
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---- key schema ----------------------------------------------------------------------------


def workers_prefix(deployment: str) -> str:
    """The prefix the frontend lists and watches (docs/security.md, "etcd keys")."""
    return f"/dynkv/{deployment}/workers/"


def worker_key(deployment: str, worker_id: str) -> str:
    """etcd key of one worker's registration."""
    return f"{workers_prefix(deployment)}{worker_id}"


def parse_worker_key(key: str) -> tuple[str, str]:
    """(deployment, worker_id) of a registration key; ValueError for any other key."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] or parts[1] != "dynkv" or parts[3] != "workers":
        raise ValueError(f"not a worker registration key: {key!r}")
    if not parts[2] or not parts[4]:
        raise ValueError(f"not a worker registration key: {key!r}")
    return parts[2], parts[4]


# ---- signature -----------------------------------------------------------------------------


def canonical(key: str, data: Mapping[str, Any]) -> bytes:
    """The signed bytes: the key and every field but the signature, in one stable JSON form."""
    fields = {k: v for k, v in data.items() if k != SIGNATURE_FIELD}
    return json.dumps(
        {"key": key, "record": fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def signature(key: str, data: Mapping[str, Any], secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), canonical(key, data), hashlib.sha256).hexdigest()


def signed(key: str, record: WorkerRecord | Mapping[str, Any], secret: str | None) -> dict:
    """The JSON object to PUT at `key`: the record, signed when there is a secret."""
    data = record.to_json() if isinstance(record, WorkerRecord) else dict(record)
    data.pop(SIGNATURE_FIELD, None)
    if secret:
        data[SIGNATURE_FIELD] = signature(key, data, secret)
    return data


def worker_api_key(secret: str) -> str:
    """The key vLLM's HTTP port requires (`VLLM_API_KEY`), derived from the deployment secret so
    that the frontend and the wrapper need only the one secret (docs/security.md)."""
    return hmac.new(secret.encode("utf-8"), _WORKER_KEY_CONTEXT, hashlib.sha256).hexdigest()


def decode(key: str, value: bytes | str | Mapping[str, Any], secret: str | None) -> WorkerRecord:
    """The record stored at `key`, checked: JSON object, the fields a worker needs, and — when
    `secret` is given — a valid signature. Raises BadRegistration (with its `reason`)."""
    try:
        data = value if isinstance(value, Mapping) else json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRegistration(f"{key}: not JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise BadRegistration(f"{key}: not a JSON object")
    if secret:
        sent = data.get(SIGNATURE_FIELD)
        if not isinstance(sent, str) or not sent:
            raise BadRegistration(f"{key}: unsigned record", "unsigned")
        expected = signature(key, data, secret).encode("ascii")
        if not hmac.compare_digest(sent.encode("utf-8"), expected):
            raise BadRegistration(f"{key}: signature does not match", "bad_signature")
    try:
        return WorkerRecord.model_validate(data)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise BadRegistration(f"{key}: invalid field(s) {', '.join(fields)}") from None
