"""The bench summary is one typed record: it round-trips through its JSON, writes only the keys
it was given for the records whose keys depend on the writer, and a report.json written by an
older or newer dynkv (keys this one does not know) reads back without them."""

from __future__ import annotations

import json

from test_report import labelled

from dynkv.bench import compare, report, scrape
from dynkv.bench.summary import (
    BenchSummary,
    CompareMeta,
    CompareReport,
    KvbmTarget,
    RunConfig,
)


def test_a_summary_round_trips_through_json():
    summary = report.summarize(labelled())
    data = summary.model_dump(mode="json")
    assert BenchSummary.model_validate_json(json.dumps(data)) == summary
    assert BenchSummary.model_validate(data).model_dump(mode="json") == data
    assert data["config"] == {"workload": "multi-turn"}  # only what the writer gave


def test_a_compare_report_round_trips_with_failed_and_measured_runs():
    measured = report.summarize(labelled("gpu-cpu"))
    failed = compare.failed_summary(
        compare.StackConfig("gpu-cpu-disk", "gpu-cpu-disk"), "boom", RunConfig()
    )
    combined = report.combined([measured, failed])
    combined.compare = CompareMeta(date="2026-01-01T00:00:00", command="dynkv bench compare")
    data = json.loads(json.dumps(combined.model_dump(mode="json")))
    assert CompareReport.model_validate(data) == combined
    assert "stack" not in data["runs"][0] and data["runs"][1]["stack"] == {
        "label": "gpu-cpu-disk",
        "profile": "gpu-cpu-disk",
        "kvbm": True,
        "topology": None,
        "error": "boom",
    }
    assert data["runs"][1]["config"] == {}  # the failed run never had a url or model


def test_unknown_keys_from_another_version_are_ignored():
    data = report.combined([report.summarize(labelled())]).model_dump(mode="json")
    data["schema"] = 9
    run = data["runs"][0]
    run["new_metric"] = {"p50": 1}
    run["ttft_ms"]["p999"] = 3.0
    run["kvbm"]["targets"][0]["kvbm_future_counter"] = 7
    run["config"]["new_option"] = True
    back = CompareReport.model_validate_json(json.dumps(data))
    assert back.runs[0].ttft_ms.p50 == run["ttft_ms"]["p50"]
    written = back.model_dump(mode="json")
    assert "schema" not in written and "new_metric" not in written["runs"][0]
    assert "new_option" not in written["runs"][0]["config"]
    # an older report without the newer keys reads with their defaults
    del run["kvbm"], run["warmup"]
    old = BenchSummary.model_validate(run)
    assert old.kvbm.targets == [] and old.warmup.requests == 0


def test_target_fields_are_the_scraped_families():
    fields = set(KvbmTarget.model_fields) - {"url", "error", "tiers"}
    assert fields == set(scrape.GAUGES) | set(scrape.COUNTERS)
