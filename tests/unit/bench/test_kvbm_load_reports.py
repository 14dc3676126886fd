"""The typed reports of `bench tiers`, `bench offload` and `bench load` (dynkv/bench/kvbm_report.py,
dynkv/bench/load_report.py): each producer returns its model, the JSON keeps the names the dicts
had, and the terminal output reads the same model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dynkv.bench import load, offload
from dynkv.bench.client import RequestResult
from dynkv.bench.kvbm_report import OffloadReport, TiersReport
from dynkv.bench.load_report import LoadReport, RssVerdict
from dynkv.bench.rss import MIB, flatness
from dynkv.cli.main import app

RUN = {"round1_ms": [10.0, 12.0], "round2_ms": [4.0], "round1_median_ms": 11.0,
       "round2_median_ms": 4.0}  # fmt: skip


def _offload_dict(**extra) -> dict:
    results = {"recompute": RUN, "floor": {**RUN, "round2_median_ms": 2.0}, "g2": RUN}
    data = offload.summarize(results, docs=2, doc_tokens=64, small_kv=1, large_kv=2)
    return {**data, **extra}


def test_the_offload_report_writes_back_exactly_what_summarize_made():
    data = _offload_dict()
    report = OffloadReport.model_validate(data)
    assert report.model_dump(mode="json") == data
    assert list(report.model_dump(mode="json")) == list(data)  # same keys, same order
    assert "peer_vs_floor" not in data and report.vs_floor("peer") is None  # not run: absent
    assert report.vs_floor("g2") == 2.0 and report.configs["g2"].round2_median_ms == 4.0
    assert report.headline()["cold_overhead"] == 1.0


def test_an_offload_configuration_this_version_does_not_name_is_kept():
    data = _offload_dict(g3_slow_ms=8.0, g3_slow_vs_floor=4.0)
    data["configs"]["g3_slow"] = RUN
    report = OffloadReport.model_validate(data)
    assert report.vs_floor("g3_slow") == 4.0 and report.model_dump(mode="json") == data


def test_bench_offload_prints_the_table_and_the_headline_line(monkeypatch):
    monkeypatch.setattr(offload, "run", lambda **_kw: OffloadReport.model_validate(_offload_dict()))
    monkeypatch.setattr("dynkv.cli.bench_kvbm_cmd._model_dir", lambda m: m)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["bench", "offload", "--only", "g2"])
    assert result.exit_code == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(last) == list(OffloadReport.HEADLINE) and last["g2_ms"] == 4.0
    assert "g2" in result.stderr and "2.00" in result.stderr  # the vs-floor column
    full = CliRunner().invoke(app, ["bench", "offload", "--json"])
    assert json.loads(full.stdout.strip().splitlines()[-1]) == _offload_dict()


def test_the_tiers_report_rows_follow_its_fields():
    report = TiersReport(
        memcpy_gbps=10.0, g1_to_g2_gbps=5.0, g2_to_g1_gbps=8.0, raw_write_gbps=2.0,
        raw_read_gbps=4.0, g3_write_gbps=1.0, g3_read_gbps=3.0, g1_g2_vs_memcpy=0.5,
        g3_read_vs_raw=0.75, g3_write_vs_raw=0.5, bytes=1000, blocks=2, bytes_per_block=500,
        o_direct=True, repeats=1, directory="/tmp",
    )  # fmt: skip
    rows = dict((path, (gbps, ratio)) for path, gbps, ratio in report.rows())
    assert rows["G1 → G2"] == (5.0, 0.5) and rows["G3 read"] == (3.0, 0.75)
    assert TiersReport.model_validate_json(report.model_dump_json()) == report


# ---- bench load ----------------------------------------------------------------------------------


class _Sampler:
    """What `load.report` reads of an RssSampler: services, their series, and the raw samples."""

    services = ("frontend", "gone")
    samples = [(0.0, {"frontend": 100 * MIB, "gone": None}), (30.0, {"frontend": 101 * MIB})]
    parts = [(0.0, {"frontend": {"python": 100 * MIB}, "gone": None})]

    def series(self, name: str):
        return [(t, v[name]) for t, v in self.samples if v.get(name) is not None]


def _results() -> list[RequestResult]:
    ok = RequestResult(0, "0", 0, ok=True, ttft=0.02, latency=0.5, output_tokens=32)
    return [ok, RequestResult(1, "1", 1, error="HTTP 503: busy")]


@pytest.mark.parametrize("samples", [False, True])
def test_the_load_report_has_the_keys_it_always_had(samples):
    options = load.LoadOptions(clients=2, duration=10, warmup=0, samples=samples, api_key="k")
    report = load.report(options, _results(), 10.0, _Sampler())
    data = json.loads(report.model_dump_json())
    keys = {"config", "requests", "completed", "errors", "error_samples", "wall_s",
            "requests_per_s", "output_tokens_per_s", "ttft_ms", "e2e_ms", "max_e2e_ms", "rss",
            "rss_ok"}  # fmt: skip
    assert set(data) == keys | ({"rss_samples", "rss_processes"} if samples else set())
    assert "api_key" not in data["config"] and data["config"]["clients"] == 2
    assert (data["requests"], data["completed"], data["errors"]) == (2, 1, 1)
    assert data["ttft_ms"] == {"p50": 20.0, "p90": 20.0, "p99": 20.0}
    assert data["rss"]["gone"] == {
        "samples": 0, "verdict": None, "flat": None,
        "reason": "no samples (the service was not running)",
    }  # fmt: skip
    assert data["rss"]["frontend"]["verdict"] == "flat" and "reason" not in data["rss"]["frontend"]
    if samples:
        assert data["rss_samples"][0] == [0.0, {"frontend": 100.0, "gone": None}]
        assert data["rss_processes"][0] == [0.0, {"frontend": {"python": 100.0}, "gone": None}]
    assert not report.passed  # one request failed
    assert LoadReport.model_validate(data).model_dump(mode="json") == data


def test_the_load_summary_reads_the_report(capsys):
    options = load.LoadOptions(clients=1, duration=10, warmup=0)
    load.summary(load.report(options, _results(), 10.0, _Sampler()))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("load: 2 requests in 10.0 s") and "errors 1" in lines[0]
    assert "error: HTTP 503: busy" in lines[1]
    assert any("RSS gone: no samples" in line for line in lines)
    assert any(line.startswith("load: RSS frontend") and "flat" in line for line in lines)


def test_flatness_is_a_verdict_record():
    verdict = flatness([(0.0, 10 * MIB), (60.0, 10 * MIB)], warmup_s=0)
    assert isinstance(verdict, RssVerdict) and verdict.verdict == "flat"
    assert "reason" not in verdict.model_dump()


def test_bench_load_against_a_real_http_server(fake_server):
    """The producer end to end: streaming clients against a local SSE server, a typed report."""
    options = load.LoadOptions(clients=2, duration=0.3, sample=0.1, warmup=0, max_tokens=2)
    report = load.run(options, fake_server, {})
    assert isinstance(report, LoadReport) and report.passed
    assert report.completed == report.requests > 0 and report.ttft_ms.p50 is not None
    assert report.rss == {} and report.config.clients == 2
