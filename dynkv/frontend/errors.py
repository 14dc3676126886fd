"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

Clients (the official `openai` package first) pick their exception class from the status and
read `error.message` / `error.code` from the body, so every error the frontend itself produces
has this shape, plus `request_id` (also in the `x-request-id` header) so that an operator can find
the log line that says what happened. A 5xx the frontend produces says what the client may do
(retry later), never why in the frontend's words: worker ids, addresses and transport errors go to
the log only (`public_message`, docs/security.md). Errors a worker returns (vLLM's own 400 for a prompt that is too long, say) are
passed through untouched: they already have it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

# OpenAI's `type` values for the statuses the frontend produces itself.
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"


class ApiError(Exception):
    """An error answered to the client; raise it anywhere under a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        worker: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.worker = worker  # the worker involved, if any (metrics label)
        self.headers = headers or {}
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.kind = kind or code or type  # the `kind` label of the errors metric

    @property
    def public_message(self) -> str:
        """What the client reads: the message itself for its own mistakes (4xx), a generic
        sentence for the frontend's and the workers' troubles (5xx)."""
        if self.status < 500:
            return self.message
        return GENERIC.get(self.code or "", GENERIC[""])

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        return error_body(self.public_message, self.type, self.param, self.code, request_id)

    def response(self, request_id: str | None = None) -> Response:
        return error_response(
            self.status,
            self.public_message,
            self.type,
            self.param,
            self.code,
            request_id=request_id,
            headers=self.headers,
        )


GENERIC = {
    "": "The server had an error while processing your request; retry later.",
    "no_worker_available": "No model server can take this request right now; retry later.",
    "upstream_timeout": "The model server did not answer in time; retry later.",
    "frontend_busy": "The server is handling too many requests; retry later.",
    "overloaded": "The server is handling too many requests; retry later.",
}


def error_body(
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    error = {"message": message, "type": type, "param": param, "code": code}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_response(
    status: int,
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    headers = dict(headers or {})
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        json.dumps(error_body(message, type, param, code, request_id)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code, kind="bad_request")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type=INVALID_REQUEST, code="invalid_api_key", kind="unauthorized")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes).",
        code="request_too_large",
        kind="too_large",
    )


def overloaded() -> ApiError:
    return ApiError(
        503,
        "too many requests in flight",
        type=SERVICE_UNAVAILABLE,
        code="overloaded",
        kind="overloaded",
        headers={"retry-after": "1"},
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def no_worker(message: str) -> ApiError:
    return ApiError(
        503, message, type=SERVICE_UNAVAILABLE, code="no_worker_available", kind="no_worker"
    )


def sse_error_event(message: str, type: str = SERVER_ERROR, code: str | None = None) -> bytes:
    """An error as one SSE event, for a stream that broke after bytes were already sent (the
    status line is gone by then): the `openai` client raises on a `data:` chunk with `error`."""
    return f"data: {json.dumps(error_body(message, type, None, code))}\n\n".encode()
