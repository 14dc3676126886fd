"""The report of `dynkv bench load`: defined once for the code that measures
(`dynkv.bench.load`, `dynkv.bench.rss.flatness`), the `--json` output and the lines on stderr
(`dynkv.bench.load.summary`).

The JSON keeps the names and values the report has always had (docs/benchmarks.md): dump with
`model_dump(mode="json")`. Records write back only the fields they were given: an RSS verdict
without samples has a `reason` and no figures, and the RSS samples are there only with
`--samples`.
"""

from __future__ import annotations

from typing import Literal

from dynkv.bench.summary import PartialRecord, Percentiles

Verdict = Literal["flat", "settling", "growing"]


class RssVerdict(PartialRecord):
    """One service's RSS over the run (MiB), judged after the warm-up (`dynkv.bench.rss`)."""

    samples: int = 0
    start_mib: float | None = None
    steady_start_mib: float | None = None
    end_mib: float | None = None
    max_mib: float | None = None
    median_mib: float | None = None
    slope_mib_per_min: float | None = None
    window_s: float | None = None
    growth_mib: float | None = None
    last_half_growth_mib: float | None = None
    limit_mib: float | None = None
    verdict: Verdict | None = None
    flat: bool | None = None
    reason: str | None = None  # why there is no verdict


class LoadConfig(PartialRecord):
    """The options the load ran with (`dynkv.bench.load.LoadOptions`, less the key; the CA an
    https frontend was verified against only when there was one)."""

    clients: int
    duration: float
    max_tokens: int
    system_words: int
    question_words: int
    timeout: float
    sample: float
    warmup: float
    rss_tolerance_pct: float
    rss_tolerance_mib: float
    ca_cert: str | None = None
    ca_cert_from: str | None = None


# [seconds since the start, {service: MiB}] and [seconds, {service: {process: MiB}}]
RssSample = tuple[float, dict[str, float | None]]
RssProcesses = tuple[float, dict[str, dict[str, float] | None]]


class LoadReport(PartialRecord):
    """Errors, throughput and latency of the clients, and every service's memory verdict."""

    config: LoadConfig
    requests: int
    completed: int
    errors: int
    error_samples: list[str] = []
    wall_s: float
    requests_per_s: float | None = None
    output_tokens_per_s: float | None = None
    ttft_ms: Percentiles = Percentiles()
    e2e_ms: Percentiles = Percentiles()
    max_e2e_ms: float | None = None
    rss: dict[str, RssVerdict] = {}
    rss_ok: bool
    rss_samples: list[RssSample] | None = None  # --samples only
    rss_processes: list[RssProcesses] | None = None  # --samples only

    @property
    def passed(self) -> bool:
        """No request failed and no service's memory was judged growing (exit 0)."""
        return self.errors == 0 and self.rss_ok
