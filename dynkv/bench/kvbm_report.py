"""The reports of the KVBM runtime's own benchmarks, `dynkv bench tiers` and `dynkv bench
offload`: defined once for the code that measures (`dynkv.bench.tiers`, `dynkv.bench.offload`),
the `--json` output and the terminal tables (`dynkv.cli.bench_kvbm_cmd`).

The JSON keeps the names and values these reports have always had (docs/benchmarks.md): dump
with `model_dump(mode="json")`. An offload report writes back only the figures it has (a
configuration left out with `--only` has no `<name>_vs_floor`), and keeps figures this version
does not name (a configuration added later) as they were given.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ConfigDict

from dynkv.bench.offload_same import SameEngineFigures, SameEngineRun
from dynkv.bench.summary import PartialRecord, Record


class TiersReport(Record):
    """Throughput of each path in GB/s, beside the raw copy or file I/O of the same bytes."""

    memcpy_gbps: float
    g1_to_g2_gbps: float
    g2_to_g1_gbps: float
    raw_write_gbps: float
    raw_read_gbps: float
    g3_write_gbps: float
    g3_read_gbps: float
    g1_g2_vs_memcpy: float  # the slower direction ÷ memcpy (target ≥ 0.5)
    g3_read_vs_raw: float  # target ≥ 0.7
    g3_write_vs_raw: float
    bytes: int
    blocks: int
    bytes_per_block: int
    o_direct: bool
    repeats: int
    directory: str

    def rows(self) -> list[tuple[str, float, float]]:
        """(path, GB/s, ratio to its raw counterpart) in the order the table shows them."""
        mem = self.memcpy_gbps
        return [
            ("memcpy (raw)", mem, 1.0),
            ("G1 → G2", self.g1_to_g2_gbps, self.g1_to_g2_gbps / mem),
            ("G2 → G1", self.g2_to_g1_gbps, self.g2_to_g1_gbps / mem),
            ("file write (raw)", self.raw_write_gbps, 1.0),
            ("G3 write", self.g3_write_gbps, self.g3_write_vs_raw),
            ("file read (raw)", self.raw_read_gbps, 1.0),
            ("G3 read", self.g3_read_gbps, self.g3_read_vs_raw),
        ]


class OffloadRun(PartialRecord):
    """One configuration's engine: per-document latencies of each round, and their medians."""

    round1_ms: list[float]
    round2_ms: list[float]
    round1_median_ms: float
    round2_median_ms: float
    same_engine: SameEngineRun | None = None  # g2_same/g3_same: what the one engine measured


class OffloadReport(PartialRecord):
    """Round-2 medians by configuration (≈ TTFT), their ratios to the floor, the targets."""

    model_config = ConfigDict(extra="allow")  # figures of configurations added later stay

    recompute_ms: float | None = None
    floor_ms: float | None = None
    peer_ms: float | None = None
    g2_ms: float | None = None
    g3_ms: float | None = None
    g3_direct_ms: float | None = None
    g2g3_ms: float | None = None
    native_ms: float | None = None  # vLLM's OffloadingConnector (opt-in, CUDA)
    cold_overhead: float | None = None  # dynkv's round 1 ÷ recompute's (target ≤ 1.03)
    recompute_vs_floor: float | None = None
    peer_vs_floor: float | None = None
    g2_vs_floor: float | None = None
    g3_vs_floor: float | None = None
    g3_direct_vs_floor: float | None = None
    g2g3_vs_floor: float | None = None
    native_vs_floor: float | None = None
    targets: dict[str, bool | None] = {}
    configs: dict[str, OffloadRun] = {}
    workload: dict[str, int] = {}
    dtype: str | None = None  # every engine's (absent from reports before it was chosen)
    same_engine: dict[str, SameEngineFigures] = {}  # by tier (g2, g3): ratios inside one engine

    # The keys `bench offload` prints on its last line without --json (scripts read them).
    HEADLINE: ClassVar[tuple[str, ...]] = (
        "recompute_ms",
        "floor_ms",
        "peer_ms",
        "g2_ms",
        "g3_ms",
        "g2g3_ms",
        "cold_overhead",
    )

    def vs_floor(self, name: str) -> float | None:
        """`<name>_vs_floor`, also for a configuration this version does not name."""
        return getattr(self, f"{name}_vs_floor", None)

    def headline(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in self.HEADLINE}


class SlowDiskReport(PartialRecord):
    """W1 on a slowed G3 (`bench offload --g3-read-delay-ms`): round-2 medians of recompute and of
    G3 with the onboard policy on (`auto`) and off (`always`), each as a ratio of recompute."""

    model_config = ConfigDict(extra="allow")

    recompute_ms: float | None = None
    g3_slow_auto_ms: float | None = None
    g3_slow_always_ms: float | None = None
    g3_slow_auto_vs_recompute: float | None = None
    g3_slow_always_vs_recompute: float | None = None
    targets: dict[str, bool | None] = {}
    configs: dict[str, dict[str, Any]] = {}  # round times, and the policy's counters per run
    workload: dict[str, float] = {}
    dtype: str | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("recompute_ms", "g3_slow_auto_ms", "g3_slow_always_ms")

    def headline(self) -> dict[str, float | None]:
        return {key: getattr(self, key) for key in self.HEADLINE}
