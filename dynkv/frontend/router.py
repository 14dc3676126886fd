"""From a parsed request to a worker's answer: the serving strategy, worker choice and retry.

Two layers, so that the disaggregated topology is one more class and nothing else changes:

- A `Strategy` decides *which steps* serve a request. `Aggregated` is one step: an `agg` worker
  takes the request as it is. A disaggregated strategy (next issue) would be two: a `prefill`
  worker with the body rewritten to `max_tokens=1`, `stream=false` and
  `kv_transfer_params={"do_remote_decode": true}` (`ctx.open(req, Role.PREFILL,
  body=req.with_body(...))`, then `await upstream.read()` for the `kv_transfer_params` it
  returns), then a `decode` worker with those params (`ctx.open(req, Role.DECODE, body=...)`),
  relayed to the client with `ctx.relay(...)`. `Router.strategies` is tried in order; the first
  whose `can_serve(pool, model)` is true serves, so disagg goes before or after `Aggregated` in
  that tuple.
- `RouteContext.open` does one step: the policy (`DYNKV_ROUTER`) picks a healthy worker of the
  role (seeing the request's session key, never its HTTP), the forwarder sends, and a connection failure before any byte reached the client marks
  that worker unhealthy and is retried once on another one.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from starlette.responses import Response

from dynkv.frontend.errors import SERVER_ERROR, ApiError, model_not_found, no_worker
from dynkv.frontend.kv_route import DECODE, KV, KvRouting, KvTicket, UsageTap
from dynkv.frontend.metrics import FrontendMetrics
from dynkv.frontend.policy import Choice, LeastOutstanding, Policy, RouteKey
from dynkv.frontend.pool import Worker, WorkerPool
from dynkv.frontend.protocol import ApiRequest
from dynkv.frontend.upstream import (
    Forwarder,
    FrontendBusy,
    Relay,
    RelayOutcome,
    RelayResponse,
    Upstream,
    UpstreamTimeout,
    WorkerUnreachable,
)
from dynkv.kvbm.roles import Role

log = logging.getLogger("dynkv.frontend")
ATTEMPTS = 2  # the first worker, and one other after a connection failure or a dead engine


@dataclass
class RouteContext:
    """What a strategy works with."""

    pool: WorkerPool
    policy: Policy
    forwarder: Forwarder
    metrics: FrontendMetrics
    # every policy a request may choose (`x-dynkv-router`), and the KV router's side
    policies: dict[str, Policy] = field(default_factory=dict)
    kv: KvRouting | None = None
    default: str | None = None  # the default policy's name (None: `policy`'s)
    _decode: LeastOutstanding = field(default_factory=lambda: LeastOutstanding(reason=DECODE))

    async def choose(
        self, req: ApiRequest, role: str, candidates: Sequence[Worker]
    ) -> tuple[str, Choice | None, KvTicket | None]:
        """(policy name, its choice, the kv bookkeeping) for one step of `req`."""
        name = req.policy or self.default or self.policy.name
        t0 = time.perf_counter()
        ticket = None
        if name == KV:
            if role == Role.DECODE:  # the prefix matters where the prompt is computed
                choice = self._decode.pick(candidates)
            else:
                kv = self.kv if self.kv is not None else KvRouting(None, None)
                picked = await kv.pick(req, candidates)
                choice, ticket = (None, None) if picked is None else (picked.choice, picked.ticket)
        else:
            policy = self.policy if name == self.policy.name else self.policies[name]
            choice = policy.pick(candidates, RouteKey(session=req.session))
        if choice is not None:
            self.metrics.decision(name, choice, time.perf_counter() - t0, ticket)
        return name, choice, ticket

    async def open(self, req: ApiRequest, role: str, body: bytes | None = None) -> Upstream:
        """Send `body` (default: the request as received, less internal fields) to a healthy
        `role` worker of the request's model; the answer's status and first chunk are in when
        this returns."""
        tried: list[str] = []
        failures: list[str] = []
        for attempt in range(ATTEMPTS):
            candidates = self.pool.healthy(req.model, role, exclude=tried)
            name, choice, ticket = await self.choose(req, role, candidates)
            if choice is None:
                break
            worker = choice.worker
            if attempt:
                self.metrics.retries.labels(req.model).inc()
                log.info("retrying on %s after: %s", worker.id, failures[-1])
            tried.append(worker.key)
            lease = self.pool.acquire(worker)
            gauge = self.metrics.inflight.labels(req.model, worker.id)
            gauge.inc()
            lease.on_release.append(gauge.dec)
            if ticket is not None:
                lease.on_release.append(ticket.prefilled)
            try:
                upstream = await self.forwarder.open(
                    worker, lease, req.path, req.forward_body() if body is None else body,
                    request_id=req.request_id,
                )  # fmt: skip
                if ticket is not None:
                    ticket.prefilled()  # the first byte is in: its prompt is computed
                    upstream.ticket = ticket
                return upstream
            except WorkerUnreachable as exc:
                lease.release()
                self.pool.mark_unhealthy(worker, exc.detail)
                self.metrics.error(model=req.model, worker=worker.id, kind=exc.kind)
                failures.append(f"{worker.id}: {exc.detail}")
            except UpstreamTimeout as exc:
                lease.release()
                # out of rotation until its /health answers again (the health checker re-probes)
                self.pool.mark_unhealthy(worker, f"timeout: {exc.detail}")
                raise ApiError(
                    504,
                    f"worker {worker.id} sent nothing within the request timeout ({exc.detail})",
                    type=SERVER_ERROR,
                    code="upstream_timeout",
                    kind="timeout",
                    worker=worker.id,
                ) from None
            except FrontendBusy:
                lease.release()
                raise ApiError(
                    503,
                    "the frontend has no free connection to the workers (too many requests in "
                    "flight); retry later",
                    type=SERVER_ERROR,
                    code="frontend_busy",
                    kind="busy",
                ) from None
            except BaseException:
                lease.release()
                raise
        raise no_worker(self._why_none(req.model, role, failures))

    def _why_none(self, model: str, role: str, failures: Sequence[str]) -> str:
        if failures:
            return f"no {role} worker of model {model!r} could be reached: " + "; ".join(failures)
        registered = self.pool.workers(model, role)
        if not registered:
            return f"no {role} worker of model {model!r} is registered"
        states = ", ".join(f"{w.id} unhealthy ({w.reason})" for w in registered)
        return f"no healthy {role} worker of model {model!r}: {states}"

    def relay(self, upstream: Upstream, req: ApiRequest) -> Response:
        """The client's response: `upstream`'s status, headers and bytes, as they arrive."""
        worker = upstream.worker.id
        if req.stream and upstream.status == 200 and upstream.first:
            self.metrics.ttft.labels(req.model, worker).observe(upstream.first_at - req.received_at)
        ticket = upstream.ticket
        if ticket is not None and upstream.status == 200:
            upstream.tap = UsageTap()

        def done(outcome: RelayOutcome) -> None:
            if ticket is not None and upstream.tap is not None and outcome.complete:
                self.metrics.cached_tokens(worker, ticket.predicted_cached, upstream.tap)
            status = upstream.status
            if outcome.broken:
                self.metrics.error(model=req.model, worker=worker, kind="stream_broken")
            elif outcome.client_gone:
                status = 499  # nginx's "client closed request"
            elif status >= 400:
                self.metrics.error(model=req.model, worker=worker, kind="upstream_status")
            self.metrics.finished(
                model=req.model,
                worker=worker,
                endpoint=req.endpoint,
                status=status,
                duration=time.monotonic() - req.received_at,
            )

        return RelayResponse(Relay(upstream, done))


class Strategy(ABC):
    """One way of serving a model's requests with the workers registered for it."""

    name: ClassVar[str]

    @abstractmethod
    def can_serve(self, pool: WorkerPool, model: str) -> bool:
        """Are the workers this strategy needs registered for `model` (healthy or not)?"""

    @abstractmethod
    async def serve(self, ctx: RouteContext, req: ApiRequest) -> Response: ...


class Aggregated(Strategy):
    """One `agg` worker does prefill and decode."""

    name = "agg"

    def can_serve(self, pool: WorkerPool, model: str) -> bool:
        return bool(pool.workers(model, Role.AGG))

    async def serve(self, ctx: RouteContext, req: ApiRequest) -> Response:
        return ctx.relay(await ctx.open(req, Role.AGG), req)


class Router:
    def __init__(self, ctx: RouteContext, strategies: Sequence[Strategy] = (Aggregated(),)) -> None:
        self.ctx = ctx
        self.strategies = tuple(strategies)

    async def route(self, req: ApiRequest) -> Response:
        """The response, or an ApiError: 404 for a model nobody ever served, 503 when none of
        its workers can take the request now."""
        pool = self.ctx.pool
        if not pool.knows(req.model):
            raise model_not_found(req.model)
        for strategy in self.strategies:
            if strategy.can_serve(pool, req.model):
                return await strategy.serve(self.ctx, req)
        raise no_worker(self._why_unserved(req.model))

    def _why_unserved(self, model: str) -> str:
        registered = self.ctx.pool.workers(model)
        if not registered:
            return f"no worker serves model {model!r} right now (none is registered)"
        roles = ", ".join(f"{w.id} ({w.role})" for w in registered)
        return (
            f"no strategy of this frontend ({', '.join(s.name for s in self.strategies)}) can "
            f"serve model {model!r} with its workers: {roles}"
        )
