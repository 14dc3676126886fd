"""The observability assets: the Grafana dashboard only queries metrics that exist (names taken
from the real KVBM registry, counters with their `_total` suffix; the router's from the names
`dynkv.router_metrics` reads, which the frontend's registry must expose once it has them), and the
Prometheus config is valid YAML with every target labelled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dynkv import router_metrics
from dynkv.frontend.metrics import FrontendMetrics
from dynkv.kvbm.metrics import KvbmMetrics
from dynkv.observability import prometheus_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dynkv-kvbm.json"
# The frontend's TTFT histogram (labels model, worker), as the frontend is to expose it.
FRONTEND = {f"dynkv_frontend_ttft_seconds{s}" for s in ("_bucket", "_sum", "_count")}
FRONTEND |= {"dynkv_frontend_requests_total"}  # labels model, worker, endpoint, status
ROUTER = set(router_metrics.SAMPLES)  # the router families status and bench read
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
    known = kvbm_sample_names() | FRONTEND | ROUTER
    assert "kvbm_matched_tokens_total" in known and "kvbm_matched_tokens" not in known
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":  # a row holds no query, only a title
            assert panel["title"] and panel["gridPos"]["w"] == 24
            continue
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
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
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


def frontend_sample_names() -> set[str]:
    """Every sample name the frontend's registry can expose (labelled families have no samples
    until a child exists, so names come from the families too)."""
    metrics = FrontendMetrics()
    names = set()
    for family in metrics.registry.collect():
        names |= {s.name for s in family.samples}
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_dashboard_router_row(dashboard):
    panels = dashboard["panels"]
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Router"]
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"]]
    assert len(below) == 6 and all(p["gridPos"]["w"] in (12, 24) for p in below)
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    for name in (
        "dynkv_router_decisions_total",
        "dynkv_router_decision_seconds_bucket",
        "dynkv_router_routed_total",
        "dynkv_router_predicted_cached_tokens_total",
        "dynkv_router_actual_cached_tokens_total",
        "dynkv_router_index_blocks",
        "dynkv_router_index_bytes",
        "dynkv_router_nats_fallbacks_total",
        "dynkv_router_acquired_blocks_total",
        "dynkv_router_duplicated_blocks_total",
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.5, sum by (le, policy)" in exprs
    assert "histogram_quantile(0.99, sum by (le, policy)" in exprs
    assert "by (policy, reason)" in exprs and "by (worker)" in exprs


def test_the_router_names_read_here_are_the_frontends():
    """The decisions counter exists today; the kv router's families come with it (issue 17): once
    the frontend's registry has its decision-time histogram, every name read here must be there."""
    exposed = frontend_sample_names()
    assert "dynkv_router_decisions_total" in exposed
    if "dynkv_router_decision_seconds" not in {n.removesuffix("_bucket") for n in exposed}:
        pytest.skip("this frontend has no kv router metrics yet")
    assert exposed >= ROUTER, ROUTER - exposed


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
