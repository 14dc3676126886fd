"""The HTTP surface: OpenAI routes, `/health` and `/metrics`, wired to pool, router and discovery.

`create_app(config)` builds a FastAPI app whose lifespan owns the shared worker client and the
background tasks (etcd discovery, health re-probes). Routes take the raw `Request`: the body is
forwarded as received, so FastAPI's own validation (and its 422s, which no OpenAI client expects)
never runs; the few checks the frontend makes itself are in `dynkv.frontend.protocol`.

While a request waits for its worker's first byte, the frontend also watches the client: one that
disconnects cancels the upstream request, so vLLM stops generating for nobody (StreamingResponse
does the same once the response has started).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from dynkv.frontend.auth import ApiKeyMiddleware
from dynkv.frontend.config import FrontendConfig
from dynkv.frontend.disagg import Disaggregated
from dynkv.frontend.discovery import Discovery, HealthChecker, workers_prefix
from dynkv.frontend.errors import SERVER_ERROR, ApiError, error_response, model_not_found
from dynkv.frontend.metrics import CONTENT_TYPE, NO_WORKER, UNKNOWN_MODEL, FrontendMetrics
from dynkv.frontend.policy import make_policy
from dynkv.frontend.pool import WorkerPool
from dynkv.frontend.protocol import Endpoint, parse_request
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
        self.pool.expect(config.models)
        self.metrics = FrontendMetrics(self.pool)
        self.policy = make_policy(config.router)
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
        )
        ctx = RouteContext(self.pool, self.policy, Forwarder(self.client), self.metrics)
        strategies = self.strategies
        if strategies is None:
            strategies = (
                Aggregated(),
                Disaggregated(fallback=cfg.disagg_fallback, transfer=cfg.disagg_transfer),
            )
        self.router = Router(ctx, strategies)
        if self.discover:
            self._etcd = AsyncEtcdClient(cfg.etcd_endpoints)
            self.discovery = Discovery(self._etcd, workers_prefix(cfg.deployment), self.pool)
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="discovery"))
        checker = HealthChecker(self.pool, self.client, interval=cfg.health_interval)
        self._tasks.append(asyncio.create_task(checker.run(), name="health-checker"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.client is not None:
            await self.client.aclose()
        if self._etcd is not None:
            await self._etcd.aclose()

    # ---- request handling ----------------------------------------------------------------

    async def serve(self, request: Request, endpoint: Endpoint) -> Response:
        started = time.monotonic()
        label = UNKNOWN_MODEL
        try:
            req = parse_request(
                endpoint,
                await request.body(),
                request_id=request.headers.get("x-request-id"),
                received_at=started,
            )
            if self.pool.knows(req.model):
                label = req.model
            assert self.router is not None, "the frontend has not started"
            return await _until_disconnect(request.receive, self.router.route(req))
        except ApiError as exc:
            worker = exc.worker or NO_WORKER
            self.metrics.error(model=label, worker=worker, kind=exc.kind)
            self._finished(label, worker, endpoint, exc.status, started)
            return exc.response()
        except ClientGone:
            self._finished(label, NO_WORKER, endpoint, CLIENT_CLOSED, started)
            return Response(status_code=CLIENT_CLOSED)

    def _finished(self, model: str, worker: str, endpoint: str, status: int, t0: float) -> None:
        self.metrics.finished(
            model=model,
            worker=worker,
            endpoint=endpoint,
            status=status,
            duration=time.monotonic() - t0,
        )

    def health(self) -> tuple[int, dict[str, Any]]:
        workers = self.pool.workers()
        body = {
            "status": "ok" if self.pool.synced else "starting",
            "workers": len(workers),
            "healthy_workers": sum(w.healthy for w in workers),
            "models": self.pool.models(),
        }
        return (200 if self.pool.synced else 503), body

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
    async def health() -> Response:
        status, body = frontend.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": frontend.model_cards()})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        for card in frontend.model_cards():
            if card["id"] == model:
                return JSONResponse(card)
        return model_not_found(model).response()

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
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def crash(_request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, f"internal error in the frontend: {exc}", type=SERVER_ERROR)

    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, key=config.api_key, metrics=frontend.metrics)
    return app
