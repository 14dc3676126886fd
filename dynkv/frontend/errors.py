"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

Clients (the official `openai` package first) pick their exception class from the status and
read `error.message` / `error.code` from the body, so every error the frontend itself produces
has this shape. Errors a worker returns (vLLM's own 400 for a prompt that is too long, say) are
passed through untouched: they already have it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

# OpenAI's `type` values for the statuses the frontend produces itself.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
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
    ) -> None:
        super().__init__(message)
        self.worker = worker  # the worker involved, if any (metrics label)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.kind = kind or code or type  # the `kind` label of the errors metric

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return Response(
        json.dumps(error_body(message, type, param, code)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code, kind="bad_request")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type=INVALID_REQUEST, code="invalid_api_key", kind="unauthorized")


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
