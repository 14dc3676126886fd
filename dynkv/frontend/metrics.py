"""The frontend's Prometheus metrics, in a registry of its own (`GET /metrics`).

A private `CollectorRegistry` rather than prometheus-client's global one: tests start several
frontends in one process, and nothing else in the process (httpx, uvicorn) belongs in this
exposition. Labels are `model` and `worker` (the worker id, `agg-0`), as the Grafana dashboard in
deploy/grafana/ queries them; requests the frontend answers itself carry `worker="none"`, and a
model nobody serves is `model="unknown"` so that arbitrary client strings cannot blow up the
label space.

- `dynkv_frontend_requests_total{model, worker, endpoint, status}`: finished requests.
- `dynkv_frontend_errors_total{model, worker, kind}`: bad_request, unauthorized,
  model_not_found, no_worker, connect (a worker refused or dropped the connection), timeout,
  stream_broken (a worker failed mid-response), upstream_status (a worker answered ≥ 400).
- `dynkv_frontend_retries_total{model}`: requests sent to a second worker after a connection
  failure.
- `dynkv_frontend_request_duration_seconds{model, worker}`: arrival → last byte.
- `dynkv_frontend_ttft_seconds{model, worker}`: arrival → first byte of a streamed response
  (the first SSE event vLLM sends carries the first token). Non-streamed requests have no time
  to first token visible from outside and are not observed here.
- `dynkv_frontend_inflight_requests{model, worker}` and `dynkv_frontend_workers{model, role,
  state}` (state `healthy`/`unhealthy`, read from the pool at scrape time).
- `dynkv_router_decisions_total{policy, reason}`: worker choices of the routing policy
  (`dynkv.frontend.policy`: reason `turn`, `fewest_outstanding`, `session` or `no_session`); a
  retried request is two decisions.
- `dynkv_frontend_registrations_rejected_total{reason}`: etcd records under the workers prefix
  that were ignored: malformed, unsigned, bad_signature (docs/security.md).
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynkv.frontend.pool import WorkerPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_WORKER = "none"
UNKNOWN_MODEL = "unknown"
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


class FrontendMetrics:
    def __init__(self, pool: WorkerPool | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynkv_frontend_requests",
            "Finished requests.",
            ["model", "worker", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "dynkv_frontend_errors",
            "Failed requests by kind.",
            ["model", "worker", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "dynkv_frontend_retries",
            "Requests retried on another worker after a connection failure.",
            ["model"],
            registry=r,
        )
        self.latency = Histogram(
            "dynkv_frontend_request_duration_seconds",
            "Request arrival to last byte.",
            ["model", "worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "dynkv_frontend_ttft_seconds",
            "Request arrival to the first byte of a streamed response (time to first token).",
            ["model", "worker"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "dynkv_frontend_inflight_requests",
            "Requests being served.",
            ["model", "worker"],
            registry=r,
        )
        self.decisions = Counter(
            "dynkv_router_decisions",
            "Worker choices of the routing policy, by policy and reason.",
            ["policy", "reason"],
            registry=r,
        )
        if pool is not None:
            r.register(_PoolCollector(pool))

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
