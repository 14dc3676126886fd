"""What the frontend reads of an OpenAI request, and nothing more.

The body is forwarded to a worker byte for byte (vLLM validates it fully and answers in its own
words); the frontend only needs the model (to route), `stream` (to label TTFT) and the fields
without which no worker could do anything (`messages` / `prompt`), which it checks itself so that
a malformed request is a 400 even when no worker is up; and the session key the `session` router
policy hashes (`session_key`), so that no policy reads HTTP.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from dynkv.frontend.errors import bad_request

Endpoint = Literal["chat", "completions"]
PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_REQUIRED: dict[Endpoint, str] = {"chat": "messages", "completions": "prompt"}
# Fields only the frontend may set: workers trust them (a KV handoff's slots), so a client's are
# dropped before forwarding.
INTERNAL_FIELDS = ("kv_transfer_params",)
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class ApiRequest:
    endpoint: Endpoint
    model: str
    stream: bool
    raw: bytes  # the body as received: what a worker gets unless a strategy rewrites it
    body: dict[str, Any]
    request_id: str | None = None  # the client's x-request-id, forwarded as received
    received_at: float = field(default_factory=time.monotonic)
    # what the frontend's logs and error answers call it: the client's id when it is a short
    # printable token, else one of the frontend's own (`app._request_id`)
    log_id: str = "-"
    session: str | None = None  # the affinity key (`session_key`), None without one
    policy: str | None = None  # the routing policy it asked for (`x-dynkv-router`), if any
    # what routing computed once for this request (the kv policy's token ids, for a retry)
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]

    def forward_body(self) -> bytes:
        """What a worker receives: the bytes as received, unless the client set an internal
        field, which is removed."""
        if not any(f in self.body for f in INTERNAL_FIELDS):
            return self.raw
        kept = {k: v for k, v in self.body.items() if k not in INTERNAL_FIELDS}
        return json.dumps(kept, separators=(",", ":")).encode()

    def with_body(self, **changes: Any) -> bytes:
        """The body with some fields replaced, serialised (a strategy rewriting a request, such
        as a disaggregated prefill with max_tokens=1 and its own `kv_transfer_params`); a
        client's internal fields are dropped unless `changes` sets them."""
        kept = {k: v for k, v in self.body.items() if k not in INTERNAL_FIELDS}
        return json.dumps({**kept, **changes}, separators=(",", ":")).encode()


def session_key(header: str | None, body: dict[str, Any]) -> str | None:
    """The request's session: its `x-session-id` header when set, else the OpenAI `user` field
    (a string), else None. The header wins so that a client can pin a conversation without
    changing what it reports as `user`."""
    if header is not None and header.strip():
        return header.strip()
    user = body.get("user")
    if isinstance(user, str) and user:
        return user
    return None


def parse_request(
    endpoint: Endpoint,
    raw: bytes,
    *,
    request_id: str | None = None,
    received_at: float | None = None,
    session_header: str | None = None,
    policy: str | None = None,
    log_id: str = "-",
) -> ApiRequest:
    """→ ApiRequest, or an ApiError 400 saying what is wrong (as OpenAI words it).
    `received_at` (monotonic) starts the request's clock when it arrived, before its body;
    `session_header` is the request's `x-session-id` header, if any."""
    try:
        body = json.loads(raw)
    except RecursionError:  # `[[[[…` nested deeper than the parser's stack: not a request
        raise bad_request(
            "We could not parse the JSON body of your request (nested too deeply). The OpenAI "
            "API expects a JSON payload.",
            code="invalid_json",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc}). The OpenAI API expects "
            "a JSON payload.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise bad_request(
            "You must provide a model parameter.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise bad_request(
            "The model parameter must be a non-empty string.",
            param="model",
            code="invalid_type",
        )
    required = _REQUIRED[endpoint]
    if required not in body or body[required] is None:
        raise bad_request(
            f"Missing required parameter: '{required}'.",
            param=required,
            code="missing_required_parameter",
        )
    if endpoint == "chat" and not isinstance(body["messages"], list):
        raise bad_request(
            "Invalid type for 'messages': expected an array of message objects.",
            param="messages",
            code="invalid_type",
        )
    return ApiRequest(
        endpoint=endpoint,
        model=model,
        stream=body.get("stream") is True,
        raw=raw,
        body=body,
        request_id=request_id,
        received_at=time.monotonic() if received_at is None else received_at,
        log_id=log_id,
        session=session_key(session_header, body),
        policy=policy,
    )
