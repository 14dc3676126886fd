"""Talking to a worker: send one request, then relay its answer to the client as it arrives.

One shared `httpx.AsyncClient` (connection pool, limits and timeouts set once in
`make_client`) carries every request. `Forwarder.open` sends the body and waits for the
worker's status line **and its first body chunk** before anything goes to the client: until then
a failure (refused connection, a worker killed mid-request) leaves the client untouched, so the
router may retry on another worker. The first chunk of a streamed answer is the first token, so
waiting for it costs the client nothing.

After that the bytes are relayed unchanged, chunk by chunk as httpx reads them (`aiter_raw`: no
decoding, no re-chunking, no buffering). If the worker fails mid-stream, an SSE stream gets a final
`data: {"error": …}` event (the `openai` client raises on it); any other body is cut off, so the
client sees a truncated response rather than a well-formed wrong one.

Cleanup (closing the upstream response, which makes vLLM abort the request, releasing the worker,
recording metrics) runs exactly once, shielded from cancellation: when the stream ends, when the
worker fails, or when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dynkv.frontend.errors import sse_error_event
from dynkv.frontend.pool import Lease, Worker
from dynkv.tls.model import ClientTLS

log = logging.getLogger("dynkv.frontend")

# Not passed back to the client: hop-by-hop headers, and those the frontend's server sets itself.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "date",
        "server",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
WORKER_HEADER = "x-dynkv-worker"


def make_client(
    *,
    connect_timeout: float,
    request_timeout: float,
    max_connections: int,
    api_key: str | None = None,
    tls: ClientTLS | None = None,
) -> httpx.AsyncClient:
    """The one client for all worker traffic. `read` is the longest silence between two chunks
    (a non-streamed request's whole generation, or a long prefill), so it is the request timeout;
    connecting is fast on a healthy worker, so a short connect timeout makes a dead one cheap.
    `trust_env=False`: worker URLs are direct, and a proxy from the environment must not carry
    them. `api_key`: the workers' `VLLM_API_KEY` (docs/security.md), sent on every request.
    `tls`: an advertised deployment's workers serve https from its CA (docs/multi-host.md),
    which is then the only one trusted."""
    return httpx.AsyncClient(
        headers={"authorization": f"Bearer {api_key}"} if api_key else None,
        timeout=httpx.Timeout(connect=connect_timeout, read=request_timeout, write=30.0, pool=30.0),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(64, max_connections),
            keepalive_expiry=30.0,
        ),
        trust_env=False,
        verify=True if tls is None else tls.ssl_context(),
    )


class WorkerUnreachable(Exception):
    """The worker could not be reached, dropped the connection before its first byte, or
    answered 5xx with an engine that its /health says is dead: nothing reached the client, so
    another worker may take the request. `kind` labels the error metric."""

    def __init__(self, worker: Worker, detail: str, kind: str = "connect") -> None:
        super().__init__(f"{worker.id}: {detail}")
        self.worker, self.detail, self.kind = worker, detail, kind


class UpstreamTimeout(Exception):
    """The worker accepted the request but sent nothing within the request timeout."""

    def __init__(self, worker: Worker, detail: str) -> None:
        super().__init__(f"{worker.id}: {detail}")
        self.worker, self.detail = worker, detail


class FrontendBusy(Exception):
    """No connection slot freed up in time (`--max-connections` requests already in flight)."""


@dataclass
class Upstream:
    """A worker's answer whose status and first chunk have arrived; nothing sent to the client."""

    worker: Worker
    lease: Lease
    response: httpx.Response
    first: bytes
    rest: AsyncIterator[bytes]
    first_at: float  # monotonic time of the first chunk
    ticket: Any = None  # the kv router's bookkeeping of this request (kv_route.KvTicket)
    tap: Callable[[bytes], None] | None = None  # sees every relayed chunk (usage accounting)

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def is_sse(self) -> bool:
        return self.response.headers.get("content-type", "").startswith("text/event-stream")

    def client_headers(self) -> dict[str, str]:
        headers = {k: v for k, v in self.response.headers.items() if k.lower() not in _DROP}
        headers[WORKER_HEADER] = self.worker.id
        return headers

    async def read(self) -> bytes:
        """The whole body (for a strategy that consumes an answer itself, such as a prefill
        step), then close."""
        try:
            return self.first + b"".join([chunk async for chunk in self.rest])
        finally:
            await self.close()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.response.aclose()
        self.lease.release()


def _detail(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Forwarder:
    """`stall_probe_after`: while a worker has sent nothing for that long, its `/health` is
    probed (with `probe_timeout`); a worker that does not answer it is hung (a stopped process,
    a wedged engine still accepting connections), and the request fails over at once instead of
    waiting out the request timeout (docs/security.md, "faults")."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        stall_probe_after: float | None = None,
        probe_timeout: float = 2.0,
    ) -> None:
        self.client = client
        self.stall_probe_after, self.probe_timeout = stall_probe_after, probe_timeout

    async def open(
        self, worker: Worker, lease: Lease, path: str, body: bytes, *, request_id: str | None
    ) -> Upstream:
        attempt = asyncio.ensure_future(self._open(worker, lease, path, body, request_id))
        if self.stall_probe_after is None:
            return await attempt
        try:
            while True:
                done, _ = await asyncio.wait({attempt}, timeout=self.stall_probe_after)
                if done:
                    return attempt.result()
                problem = await self._probe(worker)
                if problem is not None and not attempt.done():
                    attempt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await attempt
                    raise WorkerUnreachable(worker, f"hung: {problem}")
        except BaseException:
            if not attempt.done():
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await attempt
            raise

    async def _probe(self, worker: Worker) -> str | None:
        """None when the worker's /health answers 200 within the probe timeout."""
        try:
            resp = await self.client.get(worker.url + "/health", timeout=self.probe_timeout)
        except httpx.HTTPError as exc:
            return f"/health: {_detail(exc)}"
        return None if resp.status_code == 200 else f"/health answered {resp.status_code}"

    async def _open(
        self, worker: Worker, lease: Lease, path: str, body: bytes, request_id: str | None
    ) -> Upstream:
        headers: dict[str, str | bytes] = {"content-type": "application/json", "accept": "*/*"}
        if request_id:
            # as received: the ASGI server decoded the header's bytes as latin-1, and httpx
            # would refuse a str that is not ASCII (a 500 for a client's odd request id)
            headers["x-request-id"] = request_id.encode("latin-1", "replace")
        request = self.client.build_request(
            "POST", worker.url + path, content=body, headers=headers
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.PoolTimeout:
            raise FrontendBusy() from None
        except httpx.ReadTimeout as exc:
            raise UpstreamTimeout(worker, _detail(exc)) from None
        except httpx.TransportError as exc:  # refused, reset, closed before the status line
            raise WorkerUnreachable(worker, _detail(exc)) from None
        chunks = response.aiter_raw()
        try:
            first = await anext(chunks, b"")
        except httpx.ReadTimeout as exc:
            await _close(response)
            raise UpstreamTimeout(worker, _detail(exc)) from None
        except httpx.TransportError as exc:
            await _close(response)
            raise WorkerUnreachable(worker, _detail(exc)) from None
        except BaseException:  # cancelled (the client went away): vLLM aborts on the close
            await _close(response)
            raise
        if response.status_code >= 500:
            # vLLM answers 500 to every request once its engine has died, and /health 503: then
            # the worker, not the request, is at fault, and another worker can take it. A 5xx
            # from a worker whose /health still answers is the request's own error, relayed.
            problem = await self._probe(worker)
            if problem is not None:
                await _close(response)
                raise WorkerUnreachable(
                    worker, f"answered {response.status_code} and {problem}", kind="engine_dead"
                )
        return Upstream(worker, lease, response, first, chunks, time.monotonic())


async def _close(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        await response.aclose()


@dataclass
class RelayOutcome:
    upstream: Upstream
    complete: bool = False
    broken: str | None = None  # what went wrong mid-stream
    client_gone: bool = False


@dataclass
class Relay:
    """The client-facing body of one upstream answer; `on_done(outcome)` runs once at the end."""

    upstream: Upstream
    on_done: Callable[[RelayOutcome], None]
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.outcome = RelayOutcome(self.upstream)

    async def chunks(self) -> AsyncIterator[bytes]:
        up = self.upstream
        tap = up.tap
        try:
            if up.first:
                if tap is not None:
                    tap(up.first)
                yield up.first
            async for chunk in up.rest:
                if tap is not None:
                    tap(chunk)
                yield chunk
            self.outcome.complete = True
        except httpx.TransportError as exc:
            self.outcome.broken = _detail(exc)
            log.warning("worker %s failed mid-response: %s", up.worker.id, self.outcome.broken)
            if not up.is_sse:
                raise  # cut the response off: the client must not take it for complete
            yield sse_error_event(
                "The model server failed while streaming; retry the request.",
                code="stream_broken",
            )
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not (self.outcome.complete or self.outcome.broken):
            self.outcome.client_gone = True
        await self.upstream.close()
        self.on_done(self.outcome)


class RelayResponse(StreamingResponse):
    """StreamingResponse whose upstream is closed however the response ends (a client that
    disconnects cancels the body iterator mid-await; an error may skip it entirely)."""

    def __init__(self, relay: Relay) -> None:
        up = relay.upstream
        super().__init__(relay.chunks(), status_code=up.status, headers=up.client_headers())
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.aclose()
