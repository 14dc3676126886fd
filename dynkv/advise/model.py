"""The typed records of `dynkv advise`: metric snapshots in, findings out (docs/advise.md).

Snapshots are what the collector read from each worker's KVBM metrics endpoint at one moment;
the findings engine (`dynkv.advise.findings`) compares two of them and is pure, so tests stage
metric histories as these models. `--json` prints an `Advice` as is.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class WorkerMetrics(BaseModel):
    """One worker's metrics at one moment: family name → value (labels summed; counters as
    totals, gauges as read) and the skipped-block counter per `tier/reason`. A family the worker
    does not expose is absent (not measured), never 0."""

    worker: str
    role: str = "agg"  # the service's role: agg, prefill or decode
    values: dict[str, float] = Field(default_factory=dict)
    skipped: dict[str, float] = Field(default_factory=dict)  # "disk/slower_than_recompute" → n
    error: str | None = None  # the endpoint could not be read


class RouterCounts(BaseModel):
    """The frontend's router counters at one moment (docs/observability.md#router): decisions
    by `policy/reason`, and per worker the blocks its KV events stored that it held in no tier
    (acquired) and, of those, the blocks another worker held already (duplicated). Empty
    without a KV router."""

    decisions: dict[str, float] = Field(default_factory=dict)  # "round_robin/turn" → n
    acquired: dict[str, float] = Field(default_factory=dict)  # worker → blocks
    duplicated: dict[str, float] = Field(default_factory=dict)  # worker → blocks
    error: str | None = None  # the frontend's /metrics could not be read


class MetricsSnapshot(BaseModel):
    at: float  # seconds (time.time() of the read)
    workers: list[WorkerMetrics]
    router: RouterCounts | None = None  # None: the deployment has no frontend to read

    def worker(self, name: str) -> WorkerMetrics | None:
        return next((w for w in self.workers if w.worker == name), None)


class FindingKind(StrEnum):
    G2_THRASH = "g2_thrash"
    FILTER_STARVES_G3 = "filter_starves_g3"
    LOWER_TIER_SMALLER = "lower_tier_smaller"
    G3_SLOWER_THAN_RECOMPUTE = "g3_slower_than_recompute"
    NO_REUSE = "no_reuse"
    ROUTER_SPREADS_PREFIXES = "router_spreads_prefixes"


class SettingChange(BaseModel):
    """One setting to change, under each of the names it goes by: the worker environment variable,
    the profile key (`[kvbm] cpu_cache_gb`) and the `dynkv up` flag where one exists."""

    env: str
    value: str
    profile_key: str | None = None
    flag: str | None = None

    def describe(self) -> str:
        ways = [f"{self.env}={self.value}"]
        if self.profile_key:
            ways.append(f"{self.profile_key} = {self.value}")
        if self.flag:
            ways.append(self.flag)
        return " | ".join(ways)


Number = float | int | str | None


class Finding(BaseModel):
    kind: FindingKind
    worker: str | None  # None: about the deployment as a whole
    summary: str  # one line: what is wrong
    evidence: dict[str, Number]  # the window's numbers that show it
    advice: str  # what to do, and what to expect from doing it
    change: list[SettingChange] = Field(default_factory=list)


class WorkerWindow(BaseModel):
    """What one worker did in the window (None: not measured by its runtime)."""

    worker: str
    lookup_blocks: float | None = None
    host_hit_blocks: float | None = None
    disk_hit_blocks: float | None = None
    new_blocks: float | None = None  # blocks written from the device (G1→G2 or G1→G3)
    prefill_seconds_saved: float | None = None
    error: str | None = None


class Advice(BaseModel):
    name: str
    window_s: float
    workers: list[WorkerWindow]
    findings: list[Finding]
    notes: list[str] = Field(default_factory=list)  # e.g. too little traffic to judge
    pending: list[str] = Field(default_factory=list)  # checks that need data not yet exported
