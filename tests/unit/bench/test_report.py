"""Report maths against hand-computed cases, metrics scraping from a real KVBM registry, the
markdown shape and the PNG plot, for one configuration and several."""

from __future__ import annotations

import re

import pytest

from dynkv.bench import report, scrape
from dynkv.bench.client import RequestResult
from dynkv.bench.runner import RunResult
from dynkv.bench.scrape import Snapshot
from dynkv.kvbm.counters import Count
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.ports import free_port


def tier_json(stats: report.TierStats) -> dict:
    """The tier statistics as the summary's JSON has them."""
    return {
        "hit_rates": stats.hit_rates.model_dump(mode="json"),
        "kvbm": stats.kvbm.model_dump(mode="json"),
    }


def test_percentile_linear_interpolation_hand_computed():
    # x = 10, 20, 30, 40: rank h = 3q/100. p50: h = 1.5 → 20 + 0.5·10 = 25.
    # p90: h = 2.7 → 30 + 0.7·10 = 37. p99: h = 2.97 → 30 + 0.97·10 = 39.7.
    xs = [40, 10, 30, 20]
    assert report.percentile(xs, 50) == pytest.approx(25.0)
    assert report.percentile(xs, 90) == pytest.approx(37.0)
    assert report.percentile(xs, 99) == pytest.approx(39.7)
    assert report.percentile(xs, 0) == 10 and report.percentile(xs, 100) == 40
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([], 50) is None
    # 1..101: p90 is exactly the 91st value; seconds → ms scaling.
    assert report.percentiles([i / 1000 for i in range(1, 102)], 1000.0) == pytest.approx(
        {"p50": 51.0, "p90": 91.0, "p99": 100.0}
    )
    assert report.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        report.percentile(xs, 101)


def test_counter_delta_handles_missing_and_reset():
    assert report.counter_delta(10, 25) == 15
    assert report.counter_delta(None, 25) is None and report.counter_delta(3, None) is None
    assert report.counter_delta(40, 5) == 5  # the worker restarted: count from zero


def test_tier_stats_over_two_workers_and_a_missing_one():
    before = [
        Snapshot("w0", {"kvbm_matched_tokens": 100, "kvbm_onboard_blocks_h2d": 2}),
        Snapshot("w1", {"kvbm_matched_tokens": 0, "kvbm_onboard_blocks_h2d": 0}),
        Snapshot("w2", error="ConnectError"),
    ]
    after = [
        Snapshot(
            "w0",
            {
                "kvbm_matched_tokens": 356,
                "kvbm_onboard_blocks_h2d": 10,
                "kvbm_host_cache_hit_rate": 0.5,
                "kvbm_disk_cache_hit_rate": 0.1,
            },
        ),
        Snapshot(
            "w1",
            {
                "kvbm_matched_tokens": 64,
                "kvbm_onboard_blocks_h2d": 2,
                "kvbm_host_cache_hit_rate": 0.25,
            },
        ),
        Snapshot("w2", error="ConnectError"),
    ]
    stats = tier_json(report.tier_stats(before, after))
    assert stats["hit_rates"] == {"host": pytest.approx(0.375), "disk": pytest.approx(0.1)}
    kvbm = stats["kvbm"]
    assert kvbm["matched_tokens"] == 320 and kvbm["onboard_blocks_h2d"] == 10
    assert kvbm["onboard_blocks_d2d"] is None  # no target exposes it
    assert [t["error"] for t in kvbm["targets"]] == [None, None, "ConnectError"]
    empty = tier_json(report.tier_stats([], []))
    assert empty["hit_rates"] == {"host": None, "disk": None}
    assert empty["kvbm"]["matched_tokens"] is None


def test_a_worker_without_tiers_is_left_out_of_the_aggregates():
    """disagg: the prefill worker has the tiers, the decode worker only the handoff."""
    before = [
        Snapshot("prefill", {"kvbm_matched_tokens": 0}),
        Snapshot("decode", {"kvbm_matched_tokens": 0}),
    ]
    sizes = {"kvbm_host_blocks_total": 0, "kvbm_disk_blocks_total": 0}
    after = [
        Snapshot(
            "prefill",
            {
                "kvbm_matched_tokens": 200,
                "kvbm_host_cache_hit_rate": 0.5,
                "kvbm_disk_cache_hit_rate": 0.0,
                "kvbm_host_blocks_total": 1000,
                "kvbm_disk_blocks_total": 0,
            },
        ),
        Snapshot("decode", {"kvbm_matched_tokens": 400, "kvbm_host_cache_hit_rate": 0.0, **sizes}),
    ]
    stats = tier_json(report.tier_stats(before, after))
    assert stats["hit_rates"] == {"host": 0.5, "disk": None}  # G3 exists nowhere
    assert stats["kvbm"]["matched_tokens"] == 200
    decode = stats["kvbm"]["targets"][1]
    assert decode["tiers"] is False and decode["kvbm_matched_tokens"] == 400  # still reported


def test_scrape_a_real_kvbm_registry_before_and_after():
    metrics = KvbmMetrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        metrics.host_blocks_total.set(100)  # a worker with both tiers
        metrics.disk_blocks_total.set(200)
        metrics.count(Count.MATCHED_TOKENS, 32)
        before = scrape.scrape_all([url])
        metrics.count(Count.MATCHED_TOKENS, 96)
        metrics.count(Count.ONBOARD_H2D, 3)
        metrics.record_request(queried=4, host_hits=3, disk_hits=1)
        after = scrape.scrape_all([url])
    finally:
        metrics.close()
    assert before[0].error is None and before[0].values["kvbm_matched_tokens"] == 32
    stats = tier_json(report.tier_stats(before, after))
    assert stats["kvbm"]["matched_tokens"] == 96 and stats["kvbm"]["onboard_blocks_h2d"] == 3
    assert stats["kvbm"]["onboard_blocks_d2d"] == 0
    assert stats["hit_rates"] == {"host": 0.75, "disk": 0.25}
    assert after[0].values["kvbm_host_blocks_total"] == 100  # read off the wire, as gauges
    assert stats["kvbm"]["targets"][0]["tiers"] is True


def test_parse_counts_total_suffix_with_or_without_type_lines_and_skips_others():
    typed = (
        "# TYPE kvbm_matched_tokens_total counter\n"
        "kvbm_matched_tokens_total 5.0\n"
        "# TYPE kvbm_matched_tokens_created gauge\n"
        "kvbm_matched_tokens_created 1.7e9\n"
        'kvbm_host_cache_hit_rate{worker="a"} 0.5\n'
        "vllm_num_requests_running 3\n"
    )
    assert scrape.parse(typed) == {"kvbm_matched_tokens": 5.0, "kvbm_host_cache_hit_rate": 0.5}
    untyped = 'kvbm_onboard_blocks_d2d_total{a="1"} 2\nkvbm_onboard_blocks_d2d_total{a="2"} 3\n'
    gauge = "# TYPE kvbm_host_blocks_total gauge\nkvbm_host_blocks_total 1525.0\n"
    assert scrape.parse(gauge) == {"kvbm_host_blocks_total": 1525.0}  # a gauge keeps `_total`
    assert scrape.parse(untyped) == {"kvbm_onboard_blocks_d2d": 5.0}


def test_scrape_of_nothing_listening_is_an_error_not_an_exception():
    snap = scrape.scrape(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=2)
    assert snap.error and snap.values == {}


def result(index, round_, ttft, itl, latency, tokens, ok=True, error=None, prompt=100):
    return RequestResult(
        index,
        f"s{index}",
        round_,
        ok=ok,
        error=error,
        ttft=ttft,
        itl=itl,
        latency=latency,
        output_tokens=tokens,
        prompt_tokens=prompt if ok else None,
    )


def labelled(label="A", duration=2.0, metrics=True) -> report.LabelledRun:
    results = [
        result(0, 1, 0.100, [0.010, 0.020], 0.130, 3),
        result(1, 1, 0.300, [0.030], 0.330, 2),
        result(2, 2, 0.050, [0.010, 0.010, 0.040], 0.110, 4),
        result(3, 2, None, [], None, 0, ok=False, error="HTTP 500: boom"),
    ]
    run = RunResult(results, duration, warmup=[result(9, 1, 0.1, [], 0.1, 1)])
    before = [Snapshot("w", {"kvbm_matched_tokens": 0})] if metrics else []
    after = (
        [Snapshot("w", {"kvbm_matched_tokens": 150, "kvbm_host_cache_hit_rate": 0.5})]
        if metrics
        else []
    )
    return report.LabelledRun(label, run, {"workload": "multi-turn"}, before, after)


def test_summarize_hand_computed():
    summary = report.summarize(labelled())
    s = summary.model_dump(mode="json")
    assert set(s) >= {"ttft_ms", "itl_ms", "latency_ms", "requests_per_s", "hit_rates"}
    # TTFT over the 3 ok requests: 50, 100, 300 ms → p50 100; p90 h=1.8 → 100 + 0.8·200 = 260.
    assert s["ttft_ms"] == pytest.approx({"p50": 100.0, "p90": 260.0, "p99": 296.0})
    # ITL pooled: 10, 10, 10, 20, 30, 40 ms → p50 h=2.5 → 15; p90 h=4.5 → 35.
    assert s["itl_ms"]["p50"] == pytest.approx(15.0) and s["itl_ms"]["p90"] == pytest.approx(35.0)
    assert s["latency_ms"]["p50"] == pytest.approx(130.0)
    assert s["requests_per_s"] == pytest.approx(1.5)  # 3 ok in 2 s
    assert s["output_tokens_per_s"] == pytest.approx(4.5)  # 9 tokens in 2 s
    assert (s["requests"], s["completed"], s["errors"]) == (4, 3, 1)
    assert s["error_samples"] == ["HTTP 500: boom"]
    assert s["prompt_tokens"] == 300 and s["output_tokens"] == 9
    assert s["kvbm"]["matched_token_fraction"] == pytest.approx(0.5)  # 150 of 300
    assert s["hit_rates"] == {"host": 0.5, "disk": None}
    assert [(r["round"], r["requests"]) for r in s["rounds"]] == [(1, 2), (2, 1)]
    assert s["rounds"][0]["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["warmup"] == {"requests": 1, "errors": 0}
    assert "stack" not in s  # `bench serve`'s JSON has no stack
    assert report.combined([summary]).model_dump(mode="json") == {"runs": [s]}
    assert report.combined([summary, summary]).runs == [summary, summary]


def test_summarize_with_nothing_ok_gives_nulls():
    run = RunResult([result(0, 1, None, [], None, 0, ok=False, error="x")], 0.0)
    s = report.summarize(report.LabelledRun("empty", run)).model_dump(mode="json")
    assert s["ttft_ms"] == {"p50": None, "p90": None, "p99": None}
    assert s["requests_per_s"] is None and s["rounds"] == [] and s["errors"] == 1


def cells(line: str) -> list[str]:
    """Markdown cells: split on the pipes that are not escaped."""
    return re.split(r"(?<!\\)\|", line)[1:-1]


def test_markdown_table_shape_for_several_configurations():
    summaries = [report.summarize(labelled("G1 only")), report.summarize(labelled("G1|G2", 1.0))]
    text = report.markdown(summaries, title="W1")
    lines = text.splitlines()
    assert lines[0] == "## W1"
    table = [line for line in lines if line.startswith("|")]
    main, rounds = table[:4], table[4:]
    assert [len(cells(line)) for line in main] == [14] * 4
    assert main[1] == "|" + "---|" * 14
    assert [len(cells(line)) for line in rounds] == [3] * 4
    assert main[2].startswith("| G1 only | 4 | 1 | 100.0 | 260.0 | 296.0 |")
    assert "| G1\\|G2 |" in main[3] and "| 3.00 |" in main[3] and "| 50.0% | – |" in main[3]
    assert rounds[0] == "| round | G1 only | G1\\|G2 |"
    assert rounds[2:] == ["| 1 | 200.0 | 200.0 |", "| 2 | 50.0 | 50.0 |"]


def test_plot_writes_a_valid_png(tmp_path):
    summaries = [report.summarize(labelled("a")), report.summarize(labelled("b", metrics=False))]
    out = report.plot(summaries, tmp_path / "ttft.png", title="TTFT")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (700, 420)
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
