"""The HTTP surface: OpenAI routes, `/health` and `/metrics`, wired to pool, router and discovery.

`create_app(config)` builds a FastAPI app whose lifespan owns the shared worker client and the
background tasks (etcd discovery, health re-probes). Routes take the raw `Request`: the body is
forwarded as received, so FastAPI's own validation (and its 422s, which no OpenAI client expects)
never runs; the few checks the frontend makes itself are in `dynkv.frontend.protocol`.

While a request waits for its worker's first byte, the frontend also watches the client: one that
disconnects cancels the upstream request, so vLLM stops generating for nobody (StreamingResponse
does the same once the response has started).

Bounded (docs/security.md): a body over `max_body_bytes` is a 413 before it is read whole, more
than `max_concurrency` requests at once get a 503 with `Retry-After`, and a `max_tokens` over
`max_tokens_limit` is a 400. Every error the frontend answers carries a request id, and its 5xx
messages are generic: the details (worker ids, transport errors) go to the log with that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from dynkv.frontend.auth import ApiKeyMiddleware, check_bearer
from dynkv.frontend.config import FrontendConfig
from dynkv.frontend.disagg import Disaggregated
from dynkv.frontend.discovery import Discovery, HealthChecker, workers_prefix
from dynkv.frontend.errors import (
    SERVER_ERROR,
    ApiError,
    bad_request,
    error_response,
    model_not_found,
    overloaded,
    too_large,
)
from dynkv.frontend.kv_route import ROUTER_HEADER, kv_routing, policy_override
from dynkv.frontend.metrics import CONTENT_TYPE, NO_WORKER, UNKNOWN_MODEL, FrontendMetrics
from dynkv.frontend.policy import POLICIES, LeastOutstanding, make_policy
from dynkv.frontend.pool import WorkerPool
from dynkv.frontend.protocol import SESSION_HEADER, Endpoint, parse_request
from dynkv.frontend.router import Aggregated, RouteContext, Router, Strategy
from dynkv.frontend.upstream import Forwarder, make_client
from dynkv.infra.etcd_client import AsyncEtcdClient

log = logging.getLogger("dynkv.frontend")
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client disconnected before the worker's first byte."""


class Frontend:
    """The parts of one frontend. `discover=False` leaves the pool to the caller (tests)."""

    def __init__(
        self,
        config: FrontendConfig,
        *,
        pool: WorkerPool | None = None,
        discover: bool = True,
        strategies: tuple[Strategy, ...] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool if pool is not None else WorkerPool(config.models)
        if config.deployment_secret and self.pool.secret is None:
            self.pool.secret = config.deployment_secret  # only signed registrations join
        self.active = 0  # requests being served (bounded by max_concurrency)
        self.pool.expect(config.models)
        self.metrics = FrontendMetrics(self.pool)
        self.policies = {name: make_policy(name) for name in POLICIES}
        self.policy = self.policies.get(str(config.router)) or LeastOutstanding()
        self.kv = kv_routing(config)
        if self.kv.router is not None:
            self.metrics.index.stats = self.kv.router.stats
            self.pool.on_leave.append(self.kv.remove_worker)
        self.discover = discover and bool(config.etcd_endpoints)
        self.strategies = strategies
        self.client: httpx.AsyncClient | None = None
        self.router: Router | None = None
        self.discovery: Discovery | None = None
        self._etcd: AsyncEtcdClient | None = None
        self._tasks: list[asyncio.Task] = []
        if not self.discover:
            self.pool.synced = True

    async def start(self) -> None:
        cfg = self.config
        self.client = make_client(
            connect_timeout=cfg.connect_timeout,
            request_timeout=cfg.request_timeout,
            max_connections=cfg.max_connections,
            api_key=cfg.worker_api_key,
            tls=cfg.client_tls,
        )
        forwarder = Forwarder(
            self.client,
            stall_probe_after=cfg.stall_probe_after,
            probe_timeout=cfg.probe_timeout,
        )
        ctx = RouteContext(
            self.pool,
            self.policy,
            forwarder,
            self.metrics,
            policies=self.policies,
            kv=self.kv,
            default=str(cfg.router),
        )
        await self.kv.start()
        strategies = self.strategies
        if strategies is None:
            strategies = (
                Aggregated(),
                Disaggregated(fallback=cfg.disagg_fallback, transfer=cfg.disagg_transfer),
            )
        self.router = Router(ctx, strategies)
        if self.discover:
            self._etcd = AsyncEtcdClient(cfg.etcd_endpoints, tls=cfg.client_tls)
            self.discovery = Discovery(self._etcd, workers_prefix(cfg.deployment), self.pool)
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="discovery"))
        if not cfg.deployment_secret:
            log.warning(
                "no deployment secret (%s): worker registrations are not verified",
                "DYNKV_DEPLOYMENT_SECRET",
            )
        checker = HealthChecker(
            self.pool, self.client, interval=cfg.health_interval, timeout=cfg.probe_timeout
        )
        self._tasks.append(asyncio.create_task(checker.run(), name="health-checker"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.kv.close()
        if self.client is not None:
            await self.client.aclose()
        if self._etcd is not None:
            await self._etcd.aclose()

    # ---- request handling ----------------------------------------------------------------

    async def serve(self, request: Request, endpoint: Endpoint) -> Response:
        started = time.monotonic()
        label = UNKNOWN_MODEL
        client_id = request.headers.get("x-request-id")
        rid = _request_id(client_id)
        if self.active >= self.config.max_concurrency:
            return self._failed(overloaded(), label, endpoint, started, rid)
        self.active += 1
        try:
            req = parse_request(
                endpoint,
                await _read_body(request, self.config.max_body_bytes),
                request_id=client_id,
                log_id=rid,
                received_at=started,
                session_header=request.headers.get(SESSION_HEADER),
                policy=policy_override(request.headers.get(ROUTER_HEADER)),
            )
            if self.pool.knows(req.model):
                label = req.model
            _check_max_tokens(req.body, self.config.max_tokens_limit)
            assert self.router is not None, "the frontend has not started"
            return await _until_disconnect(request.receive, self.router.route(req))
        except ApiError as exc:
            return self._failed(exc, label, endpoint, started, rid)
        except ClientGone:
            self._finished(label, NO_WORKER, endpoint, CLIENT_CLOSED, started)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            self.active -= 1

    def _failed(
        self, exc: ApiError, label: str, endpoint: Endpoint, started: float, rid: str
    ) -> Response:
        worker = exc.worker or NO_WORKER
        self.metrics.error(model=label, worker=worker, kind=exc.kind)
        self._finished(label, worker, endpoint, exc.status, started)
        if exc.status >= 500:
            log.warning("request %s: %d %s: %s", rid, exc.status, exc.code, exc.message)
        return exc.response(request_id=rid)

    def _finished(self, model: str, worker: str, endpoint: str, status: int, t0: float) -> None:
        self.metrics.finished(
            model=model,
            worker=worker,
            endpoint=endpoint,
            status=status,
            duration=time.monotonic() - t0,
        )

    def health(self, *, detail: bool = True) -> tuple[int, dict[str, Any]]:
        """`{"status": "ok"|"starting"}`, and the pool's figures when `detail` (a caller with
        the API key, or any caller when there is no key)."""
        status = (
            (200 if self.pool.synced else 503),
            {"status": "ok" if self.pool.synced else "starting"},
        )
        if not detail:
            return status
        workers = self.pool.workers()
        body = {
            **status[1],
            "workers": len(workers),
            "healthy_workers": sum(w.healthy for w in workers),
            "models": self.pool.models(),
        }
        return status[0], body

    def model_cards(self) -> list[dict[str, Any]]:
        cards = []
        for model in self.pool.models():
            started = [w.started_at for w in self.pool.workers(model) if w.started_at]
            cards.append(
                {
                    "id": model,
                    "object": "model",
                    "created": int(min(started)) if started else 0,
                    "owned_by": "dynkv",
                }
            )
        return cards


def _request_id(sent: str | None) -> str:
    """The client's `x-request-id` when it is a short printable token, else a fresh one."""
    if sent and len(sent) <= 128 and sent.isascii() and sent.isprintable():
        return sent
    return uuid.uuid4().hex


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: from its
    Content-Length before reading, or while reading a chunked one."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_max_tokens(body: dict[str, Any], limit: int | None) -> None:
    if limit is None:
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise bad_request(
                f"{name} is {value}, and this server allows at most {limit}.",
                param=name,
                code="max_tokens_too_large",
            )


async def _until_disconnect(receive: Receive, work: Awaitable[Response]) -> Response:
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        gone.cancel()
        raise
    if task.done():
        gone.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(
    config: FrontendConfig,
    *,
    pool: WorkerPool | None = None,
    discover: bool = True,
    strategies: tuple[Strategy, ...] | None = None,
) -> FastAPI:
    frontend = Frontend(config, pool=pool, discover=discover, strategies=strategies)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await frontend.start()
        try:
            yield
        finally:
            await frontend.stop()

    app = FastAPI(
        title="dynkv frontend",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.frontend = frontend

    @app.get("/health")
    async def health(request: Request) -> Response:
        key = config.api_key
        detail = not key or check_bearer(request.headers.get("authorization"), key) is None
        status, body = frontend.health(detail=detail)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": frontend.model_cards()})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        for card in frontend.model_cards():
            if card["id"] == model:
                return JSONResponse(card)
        rid = _request_id(request.headers.get("x-request-id"))
        return model_not_found(model).response(request_id=rid)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await frontend.serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await frontend.serve(request, "completions")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail) if exc.status_code != 404 else "Unknown request URL."
        return error_response(exc.status_code, message, code=code, request_id=uuid.uuid4().hex)

    @app.exception_handler(Exception)
    async def crash(_request: Request, _exc: Exception) -> Response:
        rid = uuid.uuid4().hex
        log.exception("request %s: unexpected error", rid)
        return error_response(
            500,
            "The server had an error while processing your request.",
            type=SERVER_ERROR,
            request_id=rid,
        )

    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, key=config.api_key, metrics=frontend.metrics)
    return app
