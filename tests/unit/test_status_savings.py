"""`dynkv status`'s one-line savings per worker: prefill seconds saved, `-` when not measured."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from dynkv.cli.display import kvbm_lines
from dynkv.supervisor.metrics import parse_kvbm
from dynkv.supervisor.status import ServiceStatus, StatusReport


def report(kvbm: dict) -> StatusReport:
    worker = ServiceStatus(
        name="worker", role="agg", kind="process", pid=1, running=True, healthy=True,
        uptime_s=1.0, ports={}, log="", detail="", kvbm={"reachable": True, **kvbm},
    )  # fmt: skip
    return StatusReport("dev", "/x", "running", "foreground", "embedded", [worker])


def test_savings_line_shows_the_measured_seconds():
    reg = CollectorRegistry()
    Counter("kvbm_prefill_seconds_saved", "", registry=reg).inc(12.345)
    kvbm = parse_kvbm(generate_latest(reg).decode())
    assert kvbm["prefill_seconds_saved"] == 12.345
    assert kvbm_lines(report(kvbm))[-1] == "worker savings: 12.3 s of prefill saved"


def test_savings_line_is_a_dash_when_the_runtime_does_not_measure_them():
    kvbm = parse_kvbm("kvbm_matched_tokens_total 5\n")
    assert kvbm["prefill_seconds_saved"] is None
    assert kvbm_lines(report(kvbm))[-1] == "worker savings: -"
