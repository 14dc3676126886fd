"""`dynkv status`'s router line: read from the frontend's /metrics (a staged exposition served by a
real local HTTP server, with and without its API key) by the reader `bench` uses, and shown
only when the frontend exposes router metrics."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dynkv import router_metrics
from dynkv.cli.display import router_lines
from dynkv.plan.model import ServiceInfo
from dynkv.ports import free_port
from dynkv.supervisor.router_status import read_router, summarize
from dynkv.supervisor.state import ServiceRecord
from dynkv.supervisor.status import StatusReport

STAGED = """\
# TYPE dynkv_router_decisions_total counter
dynkv_router_decisions_total{policy="kv",reason="best_ttft"} 90
dynkv_router_decisions_total{policy="kv",reason="nats_down"} 4
dynkv_router_decisions_total{policy="session",reason="session"} 6
# TYPE dynkv_router_routed_total counter
dynkv_router_routed_total{policy="kv",worker="agg-0"} 50
dynkv_router_routed_total{policy="kv",worker="agg-1"} 44
dynkv_router_routed_total{policy="session",worker="agg-1"} 6
# TYPE dynkv_router_predicted_cached_tokens_total counter
dynkv_router_predicted_cached_tokens_total{worker="agg-0"} 4800
dynkv_router_predicted_cached_tokens_total{worker="agg-1"} 4950
# TYPE dynkv_router_actual_cached_tokens_total counter
dynkv_router_actual_cached_tokens_total{worker="agg-0"} 5000
dynkv_router_actual_cached_tokens_total{worker="agg-1"} 5000
# TYPE dynkv_router_index_blocks gauge
dynkv_router_index_blocks 12345
# TYPE dynkv_router_index_bytes gauge
dynkv_router_index_bytes 2.5e+06
# TYPE dynkv_router_nats_fallbacks_total counter
dynkv_router_nats_fallbacks_total 4
# TYPE dynkv_frontend_requests_total counter
dynkv_frontend_requests_total{endpoint="chat",model="m",status="200",worker="agg-0"} 50
dynkv_frontend_requests_total{endpoint="chat",model="m",status="401",worker="none"} 3
"""
TODAY = """\
# TYPE dynkv_router_decisions_total counter
dynkv_router_decisions_total{policy="round_robin",reason="turn"} 10
# TYPE dynkv_frontend_requests_total counter
dynkv_frontend_requests_total{endpoint="chat",model="m",status="200",worker="agg-0"} 6
dynkv_frontend_requests_total{endpoint="chat",model="m",status="200",worker="agg-1"} 4
"""
KV_PARTS_AT_ZERO = """\
# TYPE dynkv_router_index_blocks gauge
dynkv_router_index_blocks 0
# TYPE dynkv_router_index_bytes gauge
dynkv_router_index_bytes 0
# TYPE dynkv_router_nats_fallbacks_total counter
dynkv_router_nats_fallbacks_total 0
"""
ROUND_ROBIN_WITH_IDLE_KV_PARTS = TODAY + KV_PARTS_AT_ZERO
NO_ROUTER = "# TYPE dynkv_frontend_inflight_requests gauge\ndynkv_frontend_inflight_requests 0\n"


def report_with(router) -> StatusReport:
    return StatusReport("dev", "/tmp/x", "running", "detached", "embedded", [], router=router)


def test_the_router_line_from_a_staged_exposition():
    data = summarize(router_metrics.parse(STAGED), "kv")
    assert data["accuracy"] == pytest.approx(9750 / 10000)
    assert data["shares"] == {"agg-0": 0.5, "agg-1": 0.5}
    assert data["decisions"] == {"kv": 94, "session": 6}
    (line,) = router_lines(report_with(data))
    assert line == (
        "router: policy kv; decisions kv 94, session 6; accuracy 0.975 (9,750 predicted / "
        "10,000 reused cached tokens); routed agg-0 50.0%, agg-1 50.0%; index 12,345 blocks, "
        "2.5 MB; NATS fallbacks 4"
    )
    assert report_with(data).to_json()["router"]["index_blocks"] == 12345


def test_todays_frontend_shows_policy_decisions_and_share_from_finished_requests():
    (line,) = router_lines(report_with(summarize(router_metrics.parse(TODAY), "round_robin")))
    assert line == (
        "router: policy round_robin; decisions round_robin 10; accuracy n/a; "
        "routed agg-0 60.0%, agg-1 40.0%"
    )


def test_the_kv_parts_only_once_the_kv_router_is_in_use():
    reading = router_metrics.parse(ROUND_ROBIN_WITH_IDLE_KV_PARTS)
    (line,) = router_lines(report_with(summarize(reading, "round_robin")))
    assert "index" not in line and "NATS" not in line
    (line,) = router_lines(report_with(summarize(reading, "kv")))
    assert line.endswith("; index 0 blocks, 0 B; NATS fallbacks 0")
    # gauges at 0 and no decision yet: nothing to show
    assert not router_metrics.parse(KV_PARTS_AT_ZERO).exposed


def test_blocks_held_twice_join_the_line_once_the_index_counts_them():
    counted = (
        "# TYPE dynkv_router_acquired_blocks_total counter\n"
        'dynkv_router_acquired_blocks_total{worker="agg-0"} 80\n'
        'dynkv_router_acquired_blocks_total{worker="agg-1"} 112\n'
        "# TYPE dynkv_router_duplicated_blocks_total counter\n"
        'dynkv_router_duplicated_blocks_total{worker="agg-1"} 102\n'
    )
    data = summarize(router_metrics.parse(TODAY + counted), "round_robin")
    assert (data["acquired_blocks"], data["duplicated_blocks"]) == (192, 102)
    (line,) = router_lines(report_with(data))
    assert line.endswith(
        "routed agg-0 60.0%, agg-1 40.0%; held twice 102 of 192 new blocks (53.1%)"
    )
    before = summarize(router_metrics.parse(TODAY), "round_robin")
    assert (
        before["acquired_blocks"] is None
        and "held twice" not in router_lines(report_with(before))[0]
    )


def test_no_router_no_line_and_no_key_in_json():
    assert not router_metrics.parse(NO_ROUTER).exposed
    assert router_lines(report_with(None)) == []
    assert "router" not in report_with(None).to_json()


@pytest.fixture
def frontend():
    """A local HTTP server answering /metrics with `served["text"]`, wanting `served["key"]`."""
    served = {"text": STAGED, "key": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            key = served["key"]
            if key and self.headers.get("authorization") != f"Bearer {key}":
                status, body = 401, b'{"error": {"message": "no"}}'
            else:
                status, body = 200, served["text"].encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def frontend_record(url: str, auth: str = "none") -> ServiceRecord:
    argv = ["python", "-m", "dynkv.frontend", "--port", "8000", "--router", "session"]
    return ServiceRecord(
        name="frontend", role="frontend", argv=argv, info=ServiceInfo(url=url, auth=auth)
    )


def test_read_router_from_the_frontend_with_its_key(frontend):
    url, served = frontend
    data = read_router(frontend_record(url), 2.0)
    assert data is not None and data["policy"] == "session" and data["nats_fallbacks"] == 4
    served["key"] = "sekret"
    assert read_router(frontend_record(url, "bearer"), 2.0) is None  # no key: no line
    assert read_router(frontend_record(url, "bearer"), 2.0, "wrong") is None
    assert read_router(frontend_record(url, "bearer"), 2.0, "sekret")["accuracy"] == 0.975
    served["text"] = NO_ROUTER
    assert read_router(frontend_record(url, "bearer"), 2.0, "sekret") is None
    assert read_router(frontend_record(f"http://127.0.0.1:{free_port()}"), 0.5) is None
