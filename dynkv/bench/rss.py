"""Resident memory of a deployment's services over time, and whether it stayed flat.

A service's RSS is the sum over its whole process tree (the worker wrapper, vLLM's API server,
its EngineCore and worker processes), sampled with psutil every few seconds by a thread. Pages
shared between processes count once per process, so the level overstates memory use; what this
module judges is its *trend*, which sharing does not change.

Flatness: the first `warmup_s` seconds are ignored (pools and caches fill then: vLLM's KV cache,
KVBM's G2 pages as they are first written, allocator arenas). Over the rest (the steady window) a
least-squares line is fitted to the samples; its rise across the window is `growth_mib`, and the
limit is `max(tolerance_pct % of the median RSS, tolerance_mib)`. A fitted line rather than
last-minus-first, so that one noisy sample neither hides nor invents a leak. The verdict:
- `flat`: the steady window's growth is within the limit;
- `settling`: it is not, but the last half of the window grew by at most half the limit — the
  RSS is levelling off (caches that fill up to their bound do this; a leak does not);
- `growing`: otherwise. Only `growing` fails a run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from dynkv.bench.load_report import RssVerdict, Verdict

MIB = 1 << 20


def tree_rss(pid: int, create_time: float | None = None) -> int | None:
    """Bytes resident in `pid` and all its descendants; None when the process is gone (or the
    pid now belongs to another process)."""
    parts = tree_parts(pid, create_time)
    return None if parts is None else sum(parts.values())


def tree_parts(pid: int, create_time: float | None = None) -> dict[str, int] | None:
    """RSS per process of the tree, keyed `name[pid]` (vLLM names its processes `VLLM::…`), so
    a trend can be traced to the process that carries it."""
    try:
        root = psutil.Process(pid)
        if create_time is not None and abs(root.create_time() - create_time) > 0.05:
            return None
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    parts: dict[str, int] = {}
    for proc in procs:
        try:
            parts[f"{proc.name()}[{proc.pid}]"] = proc.memory_info().rss
        except psutil.Error:
            continue  # exited between the listing and the read
    return parts


@dataclass
class RssSampler:
    """Samples `services` ({name: (pid, create_time)}) every `interval` s from a daemon thread."""

    services: Mapping[str, tuple[int, float | None]]
    interval: float = 2.0
    samples: list[tuple[float, dict[str, int | None]]] = field(default_factory=list)
    parts: list[tuple[float, dict[str, dict[str, int] | None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        parts = {name: tree_parts(pid, ct) for name, (pid, ct) in self.services.items()}
        self.parts.append((now, parts))
        self.samples.append(
            (now, {name: None if p is None else sum(p.values()) for name, p in parts.items()})
        )

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)
        self.sample()  # the state at the very end

    def series(self, name: str) -> list[tuple[float, int]]:
        return [(t, v[name]) for t, v in self.samples if v.get(name) is not None]


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 for fewer than two distinct x."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def flatness(
    series: list[tuple[float, int]],
    *,
    warmup_s: float,
    tolerance_pct: float = 2.0,
    tolerance_mib: float = 16.0,
) -> RssVerdict:
    """The verdict on one service's RSS series (seconds, bytes)."""
    if not series:
        return RssVerdict(
            samples=0, verdict=None, flat=None, reason="no samples (the service was not running)"
        )
    steady = [(t, v / MIB) for t, v in series if t >= warmup_s] or [
        (series[-1][0], series[-1][1] / MIB)
    ]
    slope = _slope(steady)  # MiB per second
    window = steady[-1][0] - steady[0][0]
    growth = slope * window
    half = steady[0][0] + window / 2
    tail = [p for p in steady if p[0] >= half]
    tail_growth = _slope(tail) * (tail[-1][0] - tail[0][0]) if len(tail) > 1 else 0.0
    level = statistics.median(v for _, v in steady)
    limit = max(tolerance_pct / 100 * level, tolerance_mib)
    verdict: Verdict
    if growth <= limit:
        verdict = "flat"
    elif tail_growth <= limit / 2:
        verdict = "settling"
    else:
        verdict = "growing"
    return RssVerdict(
        samples=len(series),
        start_mib=round(series[0][1] / MIB, 1),
        steady_start_mib=round(steady[0][1], 1),
        end_mib=round(series[-1][1] / MIB, 1),
        max_mib=round(max(v for _, v in series) / MIB, 1),
        median_mib=round(level, 1),
        slope_mib_per_min=round(slope * 60, 3),
        window_s=round(window, 1),
        growth_mib=round(growth, 1),
        last_half_growth_mib=round(tail_growth, 1),
        limit_mib=round(limit, 1),
        verdict=verdict,
        flat=verdict == "flat",
    )
