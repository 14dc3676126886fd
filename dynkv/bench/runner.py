"""Send a workload: warm-up first, then every request under a concurrency cap or a Poisson rate.

Scheduling rules, so that the cache sees the reuse the workload intends:
- a request waits for the one it `depends_on` (the previous round of the same user, whose answer
  is part of its prompt; or the previous send of the same document, whose KV it should reuse);
- `concurrency` caps requests in flight; requests start in workload order as slots free up;
- with `rate`, request i is released at the i-th arrival of a Poisson process (exponential gaps
  of mean 1/rate drawn from the seed), and still waits for its dependency and the cap (none by
  default in rate mode).
Warm-up requests run first, the same way, and are left out of the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from dynkv.bench.client import Endpoint, RequestResult, request_body, stream_request
from dynkv.bench.trust import Trust, verify_of
from dynkv.bench.workloads import RequestSpec, Workload

# Called after each measured request finishes: (done, total).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RunOptions:
    url: str
    model: str
    endpoint: Endpoint = "chat"
    concurrency: int | None = 1  # None: no cap (the default in rate mode)
    rate: float | None = None  # requests/s; None: as fast as the cap allows
    seed: int = 0
    timeout_s: float = 600.0
    ignore_eos: bool = False
    api_key: str | None = None
    send_session: bool = False  # each request's session (user-3, doc-1) as the OpenAI `user`
    # Router comparisons (docs/benchmarks.md#comparing-routers): the frontend's per-request
    # policy header, vLLM's cache salt (one per policy run), and each request's affinity key
    # as `x-session-id`.
    router: str | None = None
    cache_salt: str | None = None
    session_header: bool = False
    # the CA an https frontend is verified against (`dynkv.bench.trust`); None: the system's
    trust: Trust | None = None


ROUTER_HEADER = "x-dynkv-router"
SESSION_HEADER = "x-session-id"


def request_headers(spec: RequestSpec, options: RunOptions) -> dict[str, str] | None:
    """The per-request headers of a router comparison; None for a plain run."""
    headers = {}
    if options.router is not None:
        headers[ROUTER_HEADER] = options.router
    if options.session_header:
        headers[SESSION_HEADER] = spec.affinity_key
    return headers or None


@dataclass
class RunResult:
    """Results in workload order, and the wall time from the first send to the last answer."""

    results: list[RequestResult]
    duration_s: float
    warmup: list[RequestResult] = field(default_factory=list)


def arrival_times(n: int, rate: float | None, seed: int = 0) -> list[float]:
    """Release times in seconds after the start: all 0 without a rate, else Poisson arrivals."""
    if rate is None:
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"{seed}:arrivals")
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_client(
    options: RunOptions, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    headers = auth_headers(options.api_key)
    # Enough connections for the cap; read timeout is per chunk, so a slow prefill is allowed
    # up to timeout_s before its first token.
    limits = httpx.Limits(max_connections=options.concurrency or 1000, max_keepalive_connections=64)
    return httpx.AsyncClient(
        base_url=options.url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(options.timeout_s, connect=10.0),
        limits=limits,
        transport=transport,
        verify=verify_of(options.trust),
    )


async def _send_all(
    client: httpx.AsyncClient,
    workload: Workload,
    options: RunOptions,
    progress: Progress | None,
) -> tuple[list[RequestResult], float]:
    specs = workload.requests
    done = {spec.index: asyncio.Event() for spec in specs}
    answers: dict[str, list[str]] = {}
    results: dict[int, RequestResult] = {}
    slots = asyncio.Semaphore(options.concurrency) if options.concurrency else None
    releases = arrival_times(len(specs), options.rate, options.seed)
    finished = 0
    t0 = time.perf_counter()

    async def one(spec: RequestSpec, release: float) -> None:
        nonlocal finished
        try:
            delay = t0 + release - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if spec.depends_on is not None:
                await done[spec.depends_on].wait()
            async with slots or contextlib.nullcontext():
                history = answers.get(spec.session, [])[: spec.round - 1]
                payload = (
                    spec.messages(history) if options.endpoint == "chat" else spec.prompt(history)
                )
                body = request_body(
                    options.endpoint,
                    options.model,
                    payload,
                    spec.max_tokens,
                    ignore_eos=options.ignore_eos,
                    user=spec.session if options.send_session else None,
                    cache_salt=options.cache_salt,
                )
                result = RequestResult(spec.index, spec.session, spec.round)
                results[spec.index] = await stream_request(
                    client, options.endpoint, body, result, t0, request_headers(spec, options)
                )
            # A failed round leaves an empty answer: later rounds still run, on a shorter history.
            answers.setdefault(spec.session, []).append(result.text)
        finally:
            done[spec.index].set()
            finished += 1
            if progress:
                progress(finished, len(specs))

    await asyncio.gather(*(one(s, r) for s, r in zip(specs, releases, strict=True)))
    duration = time.perf_counter() - t0
    return [results[s.index] for s in specs], duration


async def run_async(
    workload: Workload,
    options: RunOptions,
    warmup: Workload | None = None,
    progress: Progress | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunResult:
    """`transport` replaces the network (tests use httpx.MockTransport)."""
    async with make_client(options, transport) as client:
        warm: list[RequestResult] = []
        if warmup and warmup.requests:
            unpaced = dataclasses.replace(options, rate=None)
            warm, _ = await _send_all(client, warmup, unpaced, None)
        results, duration = await _send_all(client, workload, options, progress)
    return RunResult(results, duration, warm)


def run(
    workload: Workload,
    options: RunOptions,
    warmup: Workload | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Blocking entry point for the CLI."""
    return asyncio.run(run_async(workload, options, warmup, progress))


def discover_model(
    url: str,
    api_key: str | None = None,
    timeout_s: float = 10.0,
    *,
    trust_env: bool = True,
    trust: Trust | None = None,
) -> str:
    """The first model the server lists at GET /v1/models (raises httpx errors, KeyError).
    `trust_env=False` ignores proxy variables (a loopback deployment); `trust`: the CA of an
    https frontend."""
    response = httpx.get(
        f"{url.rstrip('/')}/v1/models",
        headers=auth_headers(api_key),
        timeout=timeout_s,
        trust_env=trust_env,
        verify=verify_of(trust),
    )
    response.raise_for_status()
    return response.json()["data"][0]["id"]
