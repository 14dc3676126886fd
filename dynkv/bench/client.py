"""One streamed request to an OpenAI-compatible server → its timings, measured as chunks arrive.

The request asks for server-sent events (`stream: true`); httpx hands over each line as soon as
it is read from the socket, so the time of the first chunk that carries output is the time to
first token (TTFT) as the client sees it, and the gaps between later output chunks are the
inter-token latencies (ITL). vLLM sends one chunk per generated token; a server that batches
tokens into chunks gets one ITL per chunk, as in vLLM's own `benchmark_serving`. The output token
count comes from the final usage chunk (`stream_options.include_usage`) when the server sends
one, else from the number of output chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; `start` is relative to the run's start."""

    index: int
    session: str
    round: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""


def request_body(
    endpoint: Endpoint,
    model: str,
    payload: list[dict[str, str]] | str,
    max_tokens: int,
    *,
    ignore_eos: bool = False,
    user: str | None = None,
    cache_salt: str | None = None,
) -> dict[str, Any]:
    """Greedy, streamed, with usage; `ignore_eos` (a vLLM extension) fixes the output length;
    `user` (OpenAI's end-user id) is the key of the frontend's session router; `cache_salt`
    (a vLLM extension) keeps the request's prefix cache apart from any other salt's."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body["messages" if endpoint == "chat" else "prompt"] = payload
    if ignore_eos:
        body["ignore_eos"] = True
    if user is not None:
        body["user"] = user
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


def _chunk_text(chunk: dict[str, Any], endpoint: Endpoint) -> str | None:
    """The output text a chunk carries; None for chunks without choices (e.g. the usage chunk)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_detail(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        message = data.get("message") or (data.get("error") or {}).get("message") or data
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:300]
    return f"HTTP {status}: {message}"


async def stream_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    body: dict[str, Any],
    result: RequestResult,
    t0: float,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """Send `body` to `endpoint` (relative to the client's base URL), with `headers` on top of
    the client's, and fill `result` in.

    Never raises for a failed request: the error is recorded on the result, so one bad request
    does not end a benchmark. `t0` is the run's `time.perf_counter()` origin.
    """
    sent = time.perf_counter()
    result.start = sent - t0
    last: float | None = None
    chunks = 0
    pieces: list[str] = []
    try:
        async with client.stream(
            "POST", ENDPOINT_PATHS[endpoint], json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                result.error = _error_detail(response.status_code, await response.aread())
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                # SSE framing: `data: <json>` lines, blank separators, `data: [DONE]` at the end.
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk and not chunk.get("choices"):
                    result.error = f"stream error: {chunk['error']}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                piece = _chunk_text(chunk, endpoint)
                if not piece:  # role-only, empty or usage chunk: no output token yet
                    continue
                pieces.append(piece)
                chunks += 1
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # Transport failures and malformed chunks end this request, not the benchmark.
        result.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return result
    result.latency = time.perf_counter() - sent
    if not result.output_tokens:
        result.output_tokens = chunks
    if result.ttft is None and result.output_tokens:
        # Output that decoded to no text (e.g. only special tokens): first token ≈ end of stream.
        result.ttft = result.latency
    result.text = "".join(pieces)
    result.ok = result.ttft is not None
    if not result.ok:
        result.error = "the stream ended without any output token"
    return result
