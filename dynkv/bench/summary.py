"""The bench summary: what `dynkv bench serve --json` prints and `bench compare` writes to
report.json, defined once for the code that builds it (`dynkv.bench.report.summarize`,
`dynkv.bench.compare`) and the code that reads it (the markdown table, the plot, the terminal
tables).

The JSON keeps the names and values the report has always had (docs/benchmarks.md): dump with
`model_dump(mode="json")`; unknown numbers are null. Reading a report written by an older or newer
dynkv ignores keys this one does not know (`extra="ignore"`). The few records whose keys depend on
who wrote them (the run's configuration, a compare run's stack) write back only the fields that
were given, so a failed stack's summary has no `url` it never had.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PartialRecord(Record):
    """A record written with only the fields that were set (the rest are not known, not null)."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}


class Percentiles(Record):
    """p50/p90/p99 of a sample (ms in a summary); None for no values."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class HitRates(Record):
    """Blocks hit / blocks asked of KVBM per tier during the run (`dynkv.metrics_text.hit_rates`)."""

    host: float | None = None
    disk: float | None = None


class Round(Record):
    """TTFT of the successful requests of one round of a multi-turn workload."""

    round: int
    requests: int
    ttft_ms: Percentiles


class KvbmTarget(Record):
    """One metrics target: its gauges as read after the run, its counters as after − before.

    The field names are the Prometheus family names (`dynkv.bench.scrape.GAUGES`/`COUNTERS`)."""

    url: str
    error: str | None = None
    tiers: bool = True
    kvbm_host_cache_hit_rate: float | None = None
    kvbm_disk_cache_hit_rate: float | None = None
    kvbm_onboard_blocks_h2d: float | None = None
    kvbm_onboard_blocks_d2d: float | None = None
    kvbm_matched_tokens: float | None = None
    kvbm_lookup_blocks: float | None = None
    kvbm_host_hit_blocks: float | None = None
    kvbm_disk_hit_blocks: float | None = None


class Kvbm(Record):
    """KVBM counter deltas summed over the targets that have a tier, and each target's own."""

    onboard_blocks_h2d: float | None = None
    onboard_blocks_d2d: float | None = None
    matched_tokens: float | None = None
    targets: list[KvbmTarget] = []
    matched_token_fraction: float | None = None


class Warmup(Record):
    requests: int = 0
    errors: int = 0


class RunConfig(PartialRecord):
    """How a run was made: the workload and client options, and the server it was pointed at."""

    url: str | None = None
    model: str | None = None
    endpoint: str | None = None
    workload: str | None = None
    params: dict[str, Any] | None = None
    concurrency: int | None = None
    rate: float | None = None
    warmup: int | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    tokenizer: str | None = None
    metrics_urls: list[str] | None = None
    deployment: str | None = None
    send_session: bool | None = None  # each request carried its session as `user`
    router: str | None = None  # a router comparison's policy, sent as `x-dynkv-router`
    cache_salt: str | None = None  # the run's vLLM cache salt (fresh per policy run)
    session_header: bool | None = None  # each request carried its affinity key as x-session-id
    ca_cert: str | None = None  # the CA file an https frontend was verified against (a path)
    ca_cert_from: str | None = None  # --ca-cert, DYNKV_CLIENT_CA or `deployment NAME`


class StackRecord(PartialRecord):
    """A compare run's stack: its configuration (`StackConfig`), where it ran, and why it did not
    come up (`error`, None when it did)."""

    label: str | None = None
    profile: str | None = None
    kvbm: bool | None = None
    topology: str | None = None
    transport: str | None = None  # `bench compare --transports`: loopback or tls
    name: str | None = None
    state_dir: str | None = None
    up_s: float | None = None
    workers: list[str] | None = None
    env: dict[str, str] | None = None
    error: str | None = None


class WorkerLoad(Record):
    """One worker's share of a run's requests, and the cached tokens the router predicted for it
    and the worker reported reusing (counter deltas; None when the frontend has no such
    counter)."""

    worker: str
    requests: float
    share: float | None = None
    predicted_cached_tokens: float | None = None
    actual_cached_tokens: float | None = None


class RouterStats(Record):
    """A router comparison's per-policy numbers, from the frontend's /metrics before and after the
    run (`dynkv.router_metrics`): counters as deltas, the index size as read after."""

    policy: str
    cache_salt: str | None = None
    metrics_url: str | None = None
    error: str | None = None  # the frontend's /metrics could not be read
    accuracy: float | None = None  # Δpredicted / Δactual cached tokens; None: not measured
    predicted_cached_tokens: float | None = None
    actual_cached_tokens: float | None = None
    load_source: str | None = None  # the counter the per-worker load was read from
    workers: list[WorkerLoad] = []
    max_share: float | None = None  # the busiest worker's share: 1/N is even, 1.0 is one worker
    decisions: dict[str, float] = {}  # "policy:reason" → decisions during the run
    nats_fallbacks: float | None = None
    index_blocks: float | None = None
    index_bytes: float | None = None
    # blocks the workers came to hold during the run, and of those another worker held already
    # (in an agg fleet, a prefix computed twice: docs/observability.md#router); None: not counted
    computed_blocks: float | None = None
    held_twice_blocks: float | None = None

    @property
    def held_twice_share(self) -> float | None:
        if not self.computed_blocks or self.held_twice_blocks is None:
            return None
        return self.held_twice_blocks / self.computed_blocks


class BenchSummary(Record):
    """The report of one configuration's run (the `--json` shape of `dynkv bench serve`)."""

    label: str
    ttft_ms: Percentiles = Percentiles()
    itl_ms: Percentiles = Percentiles()
    latency_ms: Percentiles = Percentiles()
    requests_per_s: float | None = None
    output_tokens_per_s: float | None = None
    hit_rates: HitRates = HitRates()
    requests: int = 0
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = []
    duration_s: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    rounds: list[Round] = []
    later_rounds_ttft_ms: Percentiles = Percentiles()  # rounds ≥ 2 pooled: the reuse rounds
    kvbm: Kvbm = Kvbm()
    warmup: Warmup = Warmup()
    config: RunConfig = RunConfig()
    stack: StackRecord | None = None  # compare runs only; absent from `bench serve`'s JSON
    router: RouterStats | None = None  # router comparisons only; absent elsewhere

    @model_serializer(mode="wrap")
    def _no_stack_outside_compare(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("stack", "router"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data

    @property
    def failed(self) -> bool:
        """No measurement: the stack did not come up, or every request failed."""
        stack_error = self.stack is not None and self.stack.error
        return bool(stack_error) or bool(self.requests and not self.completed)


class CompareMeta(Record):
    """How a comparison was made: when, the command line, the configurations and stack options."""

    date: str
    command: str
    configurations: list[dict[str, Any]] = []
    stack_options: dict[str, Any] = {}


class PolicyRepeats(Record):
    """One routing policy over a router comparison's repeats (`--repeat N`): the median of its
    runs' numbers, and the ratio of its rounds ≥ 2 TTFT p50 to the first policy's."""

    policy: str
    runs: int
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    later_rounds_p50_ms: float | None = None
    later_rounds_p50_vs_first: float | None = None
    ttft_p90_vs_first: float | None = None


class CompareReport(Record):
    """Several configurations' summaries, in the order they ran (report.json of `bench compare`);
    a router comparison run with `--repeat` adds each policy's medians (`repeats`)."""

    runs: list[BenchSummary] = []
    compare: CompareMeta | None = None
    repeats: list[PolicyRepeats] = []

    @model_serializer(mode="wrap")
    def _no_meta_until_known(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.compare is None:
            data.pop("compare", None)
        if not self.repeats:
            data.pop("repeats", None)
        return data
