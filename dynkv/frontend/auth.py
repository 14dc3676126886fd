"""The optional API key: `Authorization: Bearer <key>` on every route but `/health`.

A plain ASGI middleware rather than a per-route dependency, so that no route (including 404s for
unknown paths, which would otherwise tell a stranger what exists) can forget it. `/health` stays
open because the supervisor and load balancers probe it without credentials. The comparison is
constant-time, and the key never appears in a response or a log line. `/health` answers
only healthy or not to a caller without the key (`dynkv.frontend.app`).
"""

from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from dynkv.frontend.errors import unauthorized
from dynkv.frontend.metrics import NO_WORKER, UNKNOWN_MODEL, FrontendMetrics

OPEN_PATHS = frozenset({"/health"})
MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
INCORRECT = "Incorrect API key provided."


def check_bearer(header: str | None, key: str) -> str | None:
    """None when `header` carries `key`; else the message to answer with."""
    if not header:
        return MISSING
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return MISSING
    # the ASGI server decoded the header's bytes as latin-1: compare the bytes the client sent
    # with the key's UTF-8 bytes (what a client sends for a key with non-ASCII characters)
    sent = token.strip().encode("latin-1", "replace")
    if not hmac.compare_digest(sent, key.encode("utf-8")):
        return INCORRECT
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, key: str, metrics: FrontendMetrics | None = None) -> None:
        self.app, self.key, self.metrics = app, key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        problem = check_bearer(Headers(scope=scope).get("authorization"), self.key)
        if problem is None:
            await self.app(scope, receive, send)
            return
        if self.metrics is not None:
            self.metrics.error(model=UNKNOWN_MODEL, worker=NO_WORKER, kind="unauthorized")
        await unauthorized(problem).response(request_id=uuid.uuid4().hex)(scope, receive, send)
