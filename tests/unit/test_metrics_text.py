"""One exposition parser and one hit-rate rule for `status` and `bench` (dynkv.metrics_text)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dynkv import metrics_text
from dynkv.bench import report
from dynkv.bench.scrape import Snapshot
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.supervisor.metrics import parse_kvbm


def exposition(*requests: tuple[int, int, int], host: int = 100, disk: int = 200) -> str:
    """A real runtime registry after `requests` (asked, host hits, disk hits)."""
    metrics = KvbmMetrics()
    metrics.host_blocks_total.set(host)
    metrics.disk_blocks_total.set(disk)
    for asked, h, d in requests:
        metrics.record_request(asked, h, d)
    return generate_latest(metrics.registry).decode()


def test_hit_rates_across_workers_are_a_ratio_of_sums_not_a_mean_of_ratios():
    busy = metrics_text.parse(exposition((90, 90, 0)))  # 90 of 90 blocks from G2
    idle = metrics_text.parse(exposition((10, 0, 5)))  # 0 of 10 from G2, 5 from G3
    rates = metrics_text.hit_rates([busy, idle])
    assert rates == {"host": pytest.approx(0.9), "disk": pytest.approx(0.05)}
    # the window gauges say 1.0 and 0.0: their mean (0.5) is what this rule replaces
    assert (busy["kvbm_host_cache_hit_rate"] + idle["kvbm_host_cache_hit_rate"]) / 2 == 0.5


def test_a_worker_without_the_tier_is_left_out():
    prefill = metrics_text.parse(exposition((10, 5, 0), disk=0))
    decode = metrics_text.parse(exposition((10, 0, 0), host=0, disk=0))  # fed by the handoff
    assert metrics_text.hit_rates([prefill, decode]) == {"host": 0.5, "disk": None}


def test_without_lookup_counters_the_window_gauges_are_averaged():
    """Dynamo's runtime (or an older dynkv) exposes only the gauges."""
    a = {"kvbm_host_cache_hit_rate": 0.5, "kvbm_disk_cache_hit_rate": 0.1}
    b = {"kvbm_host_cache_hit_rate": 0.25}
    assert metrics_text.hit_rates([a, b]) == {
        "host": pytest.approx(0.375),
        "disk": pytest.approx(0.1),
    }
    assert metrics_text.hit_rates([]) == {"host": None, "disk": None}
    assert metrics_text.hit_rates([{}]) == {"host": None, "disk": None}


def test_nothing_asked_yet_is_no_rate_not_zero():
    assert metrics_text.hit_rates([metrics_text.parse(exposition())]) == {
        "host": None,
        "disk": None,
    }


def test_parse_sums_counters_over_labels_and_averages_rate_gauges():
    text = (
        "# TYPE kvbm_lookup_blocks_total counter\n"
        'kvbm_lookup_blocks_total{worker="a"} 10\n'
        'kvbm_lookup_blocks_total{worker="b"} 30\n'
        'kvbm_lookup_blocks_created{worker="a"} 1.7e9\n'
        'kvbm_host_cache_hit_rate{worker="a"} 0.2\n'
        'kvbm_host_cache_hit_rate{worker="b"} 0.4\n'
        "# TYPE kvbm_host_blocks_total gauge\n"
        "kvbm_host_blocks_total 1525\n"
        "vllm_num_requests_running 3\n"
    )
    assert metrics_text.parse(text) == {
        "kvbm_lookup_blocks": 40.0,
        "kvbm_host_cache_hit_rate": pytest.approx(0.3),
        "kvbm_host_blocks_total": 1525.0,
    }
    with pytest.raises(ValueError):
        metrics_text.parse("kvbm_lookup_blocks_total not-a-number\n")


def test_status_and_bench_agree_on_one_worker():
    """The same worker, read by `status` (totals) and by `bench` (a run from zero)."""
    text = exposition((8, 4, 2), (8, 8, 0))
    status = parse_kvbm(text)
    after = Snapshot("w", metrics_text.parse(text))
    assert status["host_cache_hit_rate"] == pytest.approx(12 / 16)
    assert status["disk_cache_hit_rate"] == pytest.approx(2 / 16)
    zero = {n: 0.0 for n in metrics_text.COUNTERS}
    bench = report.tier_stats([Snapshot("w", zero)], [after]).hit_rates.model_dump()
    assert bench == {"host": status["host_cache_hit_rate"], "disk": status["disk_cache_hit_rate"]}


def test_a_counter_that_went_down_restarted_and_counts_from_zero():
    assert metrics_text.increase(10.0, 25.0) == 15.0
    assert metrics_text.increase(None, 7.0) == 7.0  # not read before: from zero
    assert metrics_text.increase(40.0, 3.0) == 3.0  # restarted in between: 3 is all it did
    before = {("agg-0",): 5.0, ("agg-1",): 9.0}
    after = {("agg-0",): 8.0, ("agg-1",): 2.0, ("agg-2",): 4.0}
    assert metrics_text.increases(before, after) == {
        ("agg-0",): 3.0,
        ("agg-1",): 2.0,
        ("agg-2",): 4.0,
    }
