"""The frontend's router metrics read from Prometheus text, for `dynkv status` and `dynkv bench
serve --compare-router`: one reading per scrape, and the differences between two.

The families are the frontend's (`dynkv.frontend.metrics`, docs/observability.md#router); they are
named here because both readers need them and neither should import the frontend. Parsing is
`dynkv.metrics_text`'s. A family the frontend does not expose (an older frontend, or a policy that
never predicts) is absent from the reading, never 0, and what is built from it is None.

- `dynkv_router_decisions_total{policy, reason}`: worker choices.
- `dynkv_router_routed_total{policy, worker}`: requests routed to each worker.
- `dynkv_router_predicted_cached_tokens_total{worker}` and
  `dynkv_router_actual_cached_tokens_total{worker}`: the prompt tokens the router expected the
  chosen worker to hold, and the tokens the worker reports it reused. **Accuracy** is
  Δpredicted / Δactual over a window (since start for `status`, over a run for `bench`).
- `dynkv_router_index_blocks`, `dynkv_router_index_bytes`: the index's size (gauges).
- `dynkv_router_nats_fallbacks_total`: decisions made without the index (NATS down).
- `dynkv_router_acquired_blocks_total{worker}` and `dynkv_router_duplicated_blocks_total{worker}`:
  blocks each worker's events stored that it held in no tier, and those another worker held
  already (in an agg fleet, a prefix computed again: `dynkv advise`'s `router_spreads_prefixes`).
- `dynkv_router_decision_seconds{policy}`: decision time (histogram; the dashboard's).
- `dynkv_frontend_requests_total{worker}`: finished requests per worker, the load's fallback
  source when `dynkv_router_routed_total` is absent.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from dynkv import metrics_text

DECISIONS = "dynkv_router_decisions"
ROUTED = "dynkv_router_routed"
PREDICTED = "dynkv_router_predicted_cached_tokens"
ACTUAL = "dynkv_router_actual_cached_tokens"
INDEX_BLOCKS = "dynkv_router_index_blocks"
INDEX_BYTES = "dynkv_router_index_bytes"
NATS_FALLBACKS = "dynkv_router_nats_fallbacks"
DECISION_SECONDS = "dynkv_router_decision_seconds"
ACQUIRED = "dynkv_router_acquired_blocks"
DUPLICATED = "dynkv_router_duplicated_blocks"
FRONTEND_REQUESTS = "dynkv_frontend_requests"
NO_WORKER = "none"  # the frontend's `worker` label of requests it answered itself

# Sample names on the wire, as the Grafana dashboard queries them.
SAMPLES = (
    f"{DECISIONS}_total",
    f"{ROUTED}_total",
    f"{PREDICTED}_total",
    f"{ACTUAL}_total",
    INDEX_BLOCKS,
    INDEX_BYTES,
    f"{NATS_FALLBACKS}_total",
    f"{ACQUIRED}_total",
    f"{DUPLICATED}_total",
    *(f"{DECISION_SECONDS}{s}" for s in ("_bucket", "_sum", "_count")),
)

Counts = dict[tuple[str, ...], float]


@dataclass
class RouterReading:
    """One scrape of a frontend: each family's values by the labels that matter (absent families
    are empty / None)."""

    decisions: Counts = field(default_factory=dict)  # (policy, reason)
    routed: Counts = field(default_factory=dict)  # (policy, worker)
    predicted: Counts = field(default_factory=dict)  # (worker,)
    actual: Counts = field(default_factory=dict)  # (worker,)
    requests: Counts = field(default_factory=dict)  # (worker,), the frontend's finished requests
    acquired: Counts = field(default_factory=dict)  # (worker,), blocks it came to hold
    duplicated: Counts = field(default_factory=dict)  # (worker,), …another worker held already
    index_blocks: float | None = None
    index_bytes: float | None = None
    nats_fallbacks: float | None = None

    @property
    def exposed(self) -> bool:
        """The frontend has a router worth a line: it made decisions or its index holds blocks
        (a frontend exposes the index gauges at 0 before it has a KV router)."""
        return bool(self.decisions or self.routed) or bool(self.index_blocks)


def _by(text: str, family: str, labels: tuple[str, ...]) -> Counts:
    out: Counts = {}
    for key, value in metrics_text.labelled(text, family).items():
        given = dict(key)
        picked = tuple(given.get(label, "") for label in labels)
        out[picked] = out.get(picked, 0.0) + value
    return out


def parse(text: str) -> RouterReading:
    """A reading of one exposition; ValueError on text that is not one."""
    plain = metrics_text.parse(text, (INDEX_BLOCKS, INDEX_BYTES, NATS_FALLBACKS))
    requests = _by(text, FRONTEND_REQUESTS, ("worker",))
    return RouterReading(
        decisions=_by(text, DECISIONS, ("policy", "reason")),
        routed=_by(text, ROUTED, ("policy", "worker")),
        predicted=_by(text, PREDICTED, ("worker",)),
        actual=_by(text, ACTUAL, ("worker",)),
        requests={k: v for k, v in requests.items() if k != (NO_WORKER,)},
        acquired=_by(text, ACQUIRED, ("worker",)),
        duplicated=_by(text, DUPLICATED, ("worker",)),
        index_blocks=plain.get(INDEX_BLOCKS),
        index_bytes=plain.get(INDEX_BYTES),
        nats_fallbacks=plain.get(NATS_FALLBACKS),
    )


def fetch(
    url: str, timeout: float, *, api_key: str | None = None, verify: bool | ssl.SSLContext = True
) -> RouterReading:
    """GET and parse a frontend's /metrics (with its API key when it has one); raises
    httpx.HTTPError or ValueError."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return parse(metrics_text.fetch_text(url, timeout, headers=headers, verify=verify))


def difference(before: RouterReading, after: RouterReading) -> RouterReading:
    """The counters' increase from `before` to `after`; the gauges as `after` read them."""
    fallbacks = None
    if after.nats_fallbacks is not None:
        fallbacks = metrics_text.increase(before.nats_fallbacks, after.nats_fallbacks)
    return RouterReading(
        decisions=metrics_text.increases(before.decisions, after.decisions),
        routed=metrics_text.increases(before.routed, after.routed),
        predicted=metrics_text.increases(before.predicted, after.predicted),
        actual=metrics_text.increases(before.actual, after.actual),
        requests=metrics_text.increases(before.requests, after.requests),
        acquired=metrics_text.increases(before.acquired, after.acquired),
        duplicated=metrics_text.increases(before.duplicated, after.duplicated),
        index_blocks=after.index_blocks,
        index_bytes=after.index_bytes,
        nats_fallbacks=fallbacks,
    )


def per_worker(counts: Counts, position: int = -1) -> dict[str, float]:
    """Values summed by the worker label (the last label unless `position` says otherwise)."""
    out: dict[str, float] = {}
    for key, value in counts.items():
        out[key[position]] = out.get(key[position], 0.0) + value
    return out


@dataclass(frozen=True)
class Load:
    """Requests per worker and where they were counted (None: nowhere)."""

    requests: dict[str, float]
    source: str | None

    def shares(self) -> dict[str, float]:
        total = sum(self.requests.values())
        return {w: n / total for w, n in self.requests.items()} if total else {}


def load(reading: RouterReading) -> Load:
    """Requests per worker: the router's own count (every policy together), else the frontend's
    finished requests."""
    routed = per_worker(reading.routed)
    if any(routed.values()):
        return Load(dict(sorted(routed.items())), f"{ROUTED}_total")
    finished = per_worker(reading.requests)
    if any(finished.values()):
        return Load(dict(sorted(finished.items())), f"{FRONTEND_REQUESTS}_total")
    return Load({}, None)


def accuracy(reading: RouterReading) -> tuple[float | None, float | None, float | None]:
    """(predicted, actual, predicted / actual) cached tokens over the workers; None where the
    frontend exposes no such counter, or (the ratio) nothing was actually reused."""
    predicted = sum(reading.predicted.values()) if reading.predicted else None
    actual = sum(reading.actual.values()) if reading.actual else None
    ratio = predicted / actual if predicted is not None and actual else None
    return predicted, actual, ratio


def policies(decisions: Mapping[tuple[str, ...], float]) -> dict[str, float]:
    """Decisions per policy."""
    return per_worker(decisions, 0)
