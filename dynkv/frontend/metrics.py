"""The frontend's Prometheus metrics, in a registry of its own (`GET /metrics`).

A private `CollectorRegistry` rather than prometheus-client's global one: tests start several
frontends in one process, and nothing else in the process (httpx, uvicorn) belongs in this
exposition. Labels are `model` and `worker` (the worker id, `agg-0`), as the Grafana dashboard in
deploy/grafana/ queries them; requests the frontend answers itself carry `worker="none"`, and a
model nobody serves is `model="unknown"` so that arbitrary client strings cannot blow up the
label space.

- `dynkv_frontend_requests_total{model, worker, endpoint, status}`: finished requests.
- `dynkv_frontend_errors_total{model, worker, kind}`: bad_request, unauthorized,
  model_not_found, no_worker, connect (a worker refused or dropped the connection), engine_dead
  (a worker answered 5xx and its /health failed), timeout, stream_broken (a worker failed
  mid-response), upstream_status (a worker answered ≥ 400).
- `dynkv_frontend_retries_total{model}`: requests sent to a second worker after a connection
  failure or a dead engine.
- `dynkv_frontend_request_duration_seconds{model, worker}`: arrival → last byte.
- `dynkv_frontend_ttft_seconds{model, worker}`: arrival → first byte of a streamed response
  (the first SSE event vLLM sends carries the first token). Non-streamed requests have no time
  to first token visible from outside and are not observed here.
- `dynkv_frontend_inflight_requests{model, worker}` and `dynkv_frontend_workers{model, role,
  state}` (state `healthy`/`unhealthy`, read from the pool at scrape time).
- `dynkv_router_decisions_total{policy, reason}`: worker choices of the routing policy
  (`dynkv.frontend.policy`: reason `turn`, `fewest_outstanding`, `session` or `no_session`); a
  retried request is two decisions.
- `dynkv_router_decision_seconds{policy}`: time to choose a worker (for `kv`: tokenizing the
  prompt in a worker thread, hashing its blocks and scoring).
- `dynkv_router_routed_total{policy, worker}`: requests sent to each worker, by policy.
- `dynkv_router_predicted_cached_tokens_total{worker}` and
  `dynkv_router_actual_cached_tokens_total{worker}`: over requests routed by `kv` whose answer
  reports `usage.prompt_tokens_details.cached_tokens` (the router's accuracy is their ratio).
- `dynkv_router_nats_fallbacks_total`: kv decisions made by load because NATS was down.
- `dynkv_router_index_blocks`, `dynkv_router_index_bytes`: the KV router's index (keys held,
  memory estimate), read at scrape time.
- `dynkv_router_acquired_blocks_total{worker}` and `dynkv_router_duplicated_blocks_total{worker}`:
  blocks each worker's KV events stored that it held in no tier (computed, or received in
  disagg), and those of them another worker held already: in an agg fleet, prefixes computed
  again (whatever routed them; `dynkv advise` reads them, docs/advise.md).
- `dynkv_frontend_registrations_rejected_total{reason}`: etcd records under the workers prefix
  that were ignored: malformed, unsigned, bad_signature (docs/security.md).
"""

from __future__ import annotations

from collections import Counter as Tally
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynkv.frontend.pool import WorkerPool
from dynkv.router_metrics import ACQUIRED, DUPLICATED

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_WORKER = "none"
UNKNOWN_MODEL = "unknown"
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _PoolCollector:
    """Workers by model, role and health, computed when Prometheus scrapes."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self):
        family = GaugeMetricFamily(
            "dynkv_frontend_workers",
            "Registered workers known to the frontend, by health.",
            labels=["model", "role", "state"],
        )
        counts = Tally(
            (w.model, w.role, "healthy" if w.healthy else "unhealthy") for w in self.pool.workers()
        )
        for (model, role, state), n in sorted(counts.items()):
            family.add_metric([model, role, state], n)
        yield family
        rejected = CounterMetricFamily(
            "dynkv_frontend_registrations_rejected",
            "Worker registrations ignored (not a record, unsigned, or mis-signed).",
            labels=["reason"],
        )
        for reason in ("malformed", "unsigned", "bad_signature"):
            rejected.add_metric([reason], self.pool.rejected[reason])
        yield rejected


class _IndexCollector:
    """The KV router's index size, read when Prometheus scrapes (0 without a router)."""

    def __init__(self) -> None:
        self.stats = None  # () -> KvRouter.stats(), set when the frontend runs a KV router

    def collect(self):
        stats = self.stats() if self.stats is not None else {}
        blocks = GaugeMetricFamily(
            "dynkv_router_index_blocks", "Block keys in the KV router's index."
        )
        blocks.add_metric([], stats.get("index_blocks", 0))
        yield blocks
        size = GaugeMetricFamily(
            "dynkv_router_index_bytes", "Memory estimate of the KV router's index, in bytes."
        )
        size.add_metric([], stats.get("index_memory_bytes", 0))
        yield size
        for name, key, doc in (
            (
                ACQUIRED,
                "acquired_blocks",
                "Blocks the worker's KV events stored that it held in no tier.",
            ),
            (
                DUPLICATED,
                "duplicated_blocks",
                "Blocks the worker acquired while another worker held them.",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for worker, blocks in sorted(stats.get(key, {}).items()):
                family.add_metric([worker], blocks)
            yield family


class FrontendMetrics:
    def __init__(self, pool: WorkerPool | None = None) -> None:
        self.registry = r = CollectorRegistry()
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        histogram = partial(Histogram, registry=r)
        self.requests = counter(
            "dynkv_frontend_requests",
            "Finished requests.",
            ["model", "worker", "endpoint", "status"],
        )
        self.errors = counter(
            "dynkv_frontend_errors", "Failed requests by kind.", ["model", "worker", "kind"]
        )
        self.retries = counter(
            "dynkv_frontend_retries",
            "Requests retried on another worker after a connection failure.",
            ["model"],
        )
        self.latency = histogram(
            "dynkv_frontend_request_duration_seconds",
            "Request arrival to last byte.",
            ["model", "worker"],
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = histogram(
            "dynkv_frontend_ttft_seconds",
            "Request arrival to the first byte of a streamed response (time to first token).",
            ["model", "worker"],
            buckets=TTFT_BUCKETS,
        )
        self.inflight = gauge(
            "dynkv_frontend_inflight_requests", "Requests being served.", ["model", "worker"]
        )
        self.decisions = counter(
            "dynkv_router_decisions",
            "Worker choices of the routing policy, by policy and reason.",
            ["policy", "reason"],
        )
        self.decision_seconds = histogram(
            "dynkv_router_decision_seconds",
            "Time to choose a worker (kv: tokenize, hash and score the prompt).",
            ["policy"],
            buckets=DECISION_BUCKETS,
        )
        self.routed = counter(
            "dynkv_router_routed",
            "Requests sent to each worker, by routing policy.",
            ["policy", "worker"],
        )
        self.predicted_cached = counter(
            "dynkv_router_predicted_cached_tokens",
            "Prompt tokens the kv router predicted cached, over answers that report usage.",
            ["worker"],
        )
        self.actual_cached = counter(
            "dynkv_router_actual_cached_tokens",
            "Prompt tokens the worker reported cached (usage.prompt_tokens_details), same requests.",
            ["worker"],
        )
        self.nats_fallbacks = counter(
            "dynkv_router_nats_fallbacks",
            "kv decisions made by load because NATS was unreachable.",
        )
        self.index = _IndexCollector()
        r.register(self.index)
        if pool is not None:
            r.register(_PoolCollector(pool))

    def decision(self, policy: str, choice, seconds: float, ticket=None) -> None:
        """One worker choice: its reason, time and destination."""
        self.decided(policy, choice.reason)
        self.decision_seconds.labels(policy).observe(seconds)
        self.routed.labels(policy, choice.worker.id).inc()
        if choice.reason == "nats_down":
            self.nats_fallbacks.inc()

    def cached_tokens(self, worker: str, predicted: int, tap) -> None:
        """A kv-routed answer is complete: compare its reported cached tokens with the
        prediction (answers without usage are not counted)."""
        actual = tap.cached_tokens()
        if actual is None:
            return
        self.predicted_cached.labels(worker).inc(predicted)
        self.actual_cached.labels(worker).inc(actual)

    def decided(self, policy: str, reason: str) -> None:
        self.decisions.labels(policy, reason).inc()

    def finished(
        self, *, model: str, worker: str, endpoint: str, status: int, duration: float
    ) -> None:
        self.requests.labels(model, worker, endpoint, str(status)).inc()
        if worker != NO_WORKER:
            self.latency.labels(model, worker).observe(duration)

    def error(self, *, model: str, worker: str, kind: str) -> None:
        self.errors.labels(model, worker, kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
