"""The observability assets: the Grafana dashboard only queries metrics that exist (names taken
from the real KVBM registry, counters with their `_total` suffix), and the Prometheus config is
valid YAML with every target labelled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.observability import prometheus_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dynkv-kvbm.json"
# The frontend's TTFT histogram (labels model, worker), as the frontend is to expose it.
FRONTEND = {f"dynkv_frontend_ttft_seconds{s}" for s in ("_bucket", "_sum", "_count")}
FRONTEND |= {"dynkv_frontend_requests_total"}  # labels model, worker, endpoint, status
METRIC = re.compile(r"\b((?:kvbm|dynkv|vllm)_[a-z0-9_]+)\b")


def kvbm_sample_names() -> set[str]:
    """Every sample name the runtime's registry exposes on the wire (counters as `_total`)."""
    metrics = KvbmMetrics()
    metrics.transfer_seconds.labels(direction="d2h").observe(0.001)  # a labelled histogram child
    return {s.name for family in metrics.registry.collect() for s in family.samples}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_panel_queries_known_metrics(dashboard):
    known = kvbm_sample_names() | FRONTEND
    assert "kvbm_matched_tokens_total" in known and "kvbm_matched_tokens" not in known
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["title"] and panel["gridPos"]["w"] > 0 and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            names = METRIC.findall(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = set(names) - known
            assert not unknown, f"{panel['title']}: unknown metrics {unknown}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert set(METRIC.findall(variable["definition"])) <= known


def test_dashboard_covers_the_issue_panels(dashboard):
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in (
        "kvbm_matched_tokens_total",
        "kvbm_offload_blocks_d2h_total",
        "kvbm_offload_blocks_h2d_total",
        "kvbm_onboard_blocks_h2d_total",
        "kvbm_onboard_blocks_d2d_total",
        "kvbm_host_cache_hit_rate",
        "kvbm_disk_cache_hit_rate",
        "dynkv_frontend_ttft_seconds_bucket",
        "kvbm_integrity_failures_total",
        "dynkv_frontend_requests_total",  # per worker: how a fleet shares the load
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.99" in exprs
    assert dashboard["uid"] == "dynkv-kvbm"


def test_prometheus_config_targets_and_labels():
    yaml = pytest.importorskip("yaml")
    text = prometheus_config(
        frontend="127.0.0.1:8000",
        kvbm={"prefill": "127.0.0.1:6880", "decode": "127.0.0.1:6881"},
        vllm=["127.0.0.1:8100"],
        scrape_interval_s=2,
    )
    config = yaml.safe_load(text)
    assert config["global"]["scrape_interval"] == "2s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert list(jobs) == ["dynkv-frontend", "kvbm", "vllm"]
    assert jobs["dynkv-frontend"]["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    assert jobs["kvbm"]["static_configs"] == [
        {"targets": ["127.0.0.1:6880"], "labels": {"worker": "prefill"}},
        {"targets": ["127.0.0.1:6881"], "labels": {"worker": "decode"}},
    ]
    assert jobs["vllm"]["static_configs"][0]["labels"] == {"worker": "worker-0"}
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    no_frontend = yaml.safe_load(prometheus_config(frontend=None, kvbm=["127.0.0.1:6880"]))
    assert [job["job_name"] for job in no_frontend["scrape_configs"]] == ["kvbm"]


def test_committed_example_is_the_default_output():
    example = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert example.read_text() == prometheus_config()
