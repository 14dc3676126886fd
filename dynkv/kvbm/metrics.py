"""KVBM metrics with Dynamo's names, in a registry of their own, and the periodic hit-rate line.

The registry is private to the runtime (vLLM has its own in the same process) and served on
DYN_KVBM_METRICS_HOST:DYN_KVBM_METRICS_PORT when DYN_KVBM_METRICS is true. Counters follow the
Prometheus client convention (`kvbm_offload_blocks_d2h_total` on the wire; the family name is
Dynamo's `kvbm_offload_blocks_d2h`; every counter is a `dynkv.kvbm.counters.Count`). The hit-rate
gauges are over a sliding window of the last requests, as blocks hit / blocks asked of KVBM (the
blocks vLLM's own prefix cache did not already hold); the same numbers are also counted
(`kvbm_lookup_blocks`, `kvbm_{host,disk}_hit_blocks`), which is what `dynkv status` and
`dynkv bench` aggregate (a ratio of sums: ratios themselves cannot be averaged across workers).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dynkv.kvbm.counters import Count

log = logging.getLogger("dynkv.kvbm")

WINDOW = 100  # requests in the hit-rate window
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass(frozen=True)
class HitRates:
    queried: int
    host_hits: int
    disk_hits: int

    @property
    def host(self) -> float:
        return self.host_hits / self.queried if self.queried else 0.0

    @property
    def disk(self) -> float:
        return self.disk_hits / self.queried if self.queried else 0.0

    def line(self) -> str:
        return (
            f"Cache Hit Rates - Host: {self.host * 100:.1f}% ({self.host_hits}/{self.queried}), "
            f"Disk: {self.disk * 100:.1f}% ({self.disk_hits}/{self.queried})"
        )


class KvbmMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, window: int = WINDOW) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.counters = {c: Counter(c.metric, c.help, c.labels, registry=r) for c in Count}
        self.host_hit_rate = Gauge(
            "kvbm_host_cache_hit_rate", "Host (G2) hit rate over the request window", registry=r
        )
        self.disk_hit_rate = Gauge(
            "kvbm_disk_cache_hit_rate", "Disk (G3) hit rate over the request window", registry=r
        )
        self.host_blocks_used = Gauge("kvbm_host_blocks_used", "Blocks held in G2", registry=r)
        self.host_blocks_total = Gauge("kvbm_host_blocks_total", "Capacity of G2", registry=r)
        self.disk_blocks_used = Gauge("kvbm_disk_blocks_used", "Blocks held in G3", registry=r)
        self.disk_blocks_total = Gauge("kvbm_disk_blocks_total", "Capacity of G3", registry=r)
        self.transfer_seconds = Histogram(
            "kvbm_transfer_seconds",
            "Duration of one batched block transfer",
            ["direction"],
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        )
        self._window: deque[tuple[int, int, int]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._version = 0
        self._logged_version = 0
        self._log_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._server = None

    # ---- counters ---------------------------------------------------------------------------------
    def count(self, counter: Count, n: float = 1, **labels: str) -> None:
        """Add `n`; a counter with label names (`Count.labels`) takes their values."""
        metric = self.counters[counter]
        (metric.labels(**labels) if counter.labels else metric).inc(n)

    def value(self, counter: Count, **labels: str) -> float:
        """The counter's current value, as a scrape would read it (summed over the label values
        not given)."""
        if not counter.labels or set(labels) == set(counter.labels):
            return self.registry.get_sample_value(counter.sample, labels or None) or 0.0
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == counter.sample and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    # ---- request-level hit rates ----------------------------------------------------------------
    def record_request(self, queried: int, host_hits: int, disk_hits: int) -> None:
        # the counters give the lifetime (and, across workers, the aggregate) ratio; the gauges
        # below are the recent window the log line shows
        self.count(Count.LOOKUP_BLOCKS, queried)
        self.count(Count.HOST_HIT_BLOCKS, host_hits)
        self.count(Count.DISK_HIT_BLOCKS, disk_hits)
        with self._lock:
            self._window.append((queried, host_hits, disk_hits))
            self._version += 1
            rates = self._rates_locked()
        self.host_hit_rate.set(rates.host)
        self.disk_hit_rate.set(rates.disk)

    def hit_rates(self) -> HitRates:
        with self._lock:
            return self._rates_locked()

    def _rates_locked(self) -> HitRates:
        q = sum(w[0] for w in self._window)
        return HitRates(q, sum(w[1] for w in self._window), sum(w[2] for w in self._window))

    def bind_capacity(
        self,
        host_used: Callable[[], float] | None,
        host_total: int,
        disk_used: Callable[[], float] | None,
        disk_total: int,
    ) -> None:
        """Block-count gauges read the tiers live at scrape time."""
        self.host_blocks_total.set(host_total)
        self.disk_blocks_total.set(disk_total)
        if host_used:
            self.host_blocks_used.set_function(host_used)
        if disk_used:
            self.disk_blocks_used.set_function(disk_used)

    # ---- exposure -------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port (a daemon thread of prometheus_client)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def serve_or_warn(self, host: str, port: int) -> bool:
        """`serve`, saying where; a port in use is a warning with the fix, never a failed engine."""
        try:
            self.serve(host, port)
        except OSError as exc:
            log.warning(
                "KVBM: cannot serve metrics on %s:%d (%s); set DYN_KVBM_METRICS_PORT to a free port",
                host,
                port,
                exc.strerror,
            )
            return False
        log.info("KVBM metrics on http://%s:%d/metrics", host, port)
        return True

    def log_if_changed(self) -> str | None:
        """Log the hit-rate line when requests arrived since the last one; returns the line."""
        with self._lock:
            if self._version == self._logged_version:
                return None
            self._logged_version = self._version
            line = self._rates_locked().line()
        log.info("KVBM %s", line)
        return line

    def start_log_thread(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                self.log_if_changed()

        self._log_thread = threading.Thread(target=loop, name="kvbm-stats", daemon=True)
        self._log_thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
