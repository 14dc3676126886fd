"""Prometheus scrapes a frontend that serves HTTPS: the config `up --observability` generates,
run by the real `prometheus` binary against the real frontend process with a self-signed
certificate, reports the target up (scheme https, the certificate verified, not skipped), with a
certificate that names only a DNS name, not the address scraped (so `server_name` is exercised
too; the plainer case, a certificate naming 127.0.0.1, differs only by that line: unit-tested in
test_plan_prometheus.py, and left out here to save CI a Prometheus start). Skips where no
prometheus binary is installed (.ci/run installs Debian's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from infra_helpers import wait_for
from tls_support import self_signed

from dynkv.plan.build import find_prometheus
from dynkv.plan.frontend import ETCD_ENDPOINTS_ENV
from dynkv.plan.prometheus import prometheus_service
from dynkv.ports import free_port
from dynkv.supervisor.process import prepare

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_prometheus() is None, reason="no prometheus binary"),
]


def _spawn(argv, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DYNKV_", "DYN_KVBM_"))}
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(argv), env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _frontend_target(prom_url: str) -> dict | None:
    try:
        targets = httpx.get(f"{prom_url}/api/v1/targets", timeout=2).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    for target in targets["activeTargets"]:
        if target["labels"].get("job") == "dynkv-frontend":
            return target
    return None


def test_prometheus_scrapes_the_https_frontend(etcd_url, tmp_path):
    cert, key = self_signed(tmp_path / "tls", ips=(), dns=("frontend.example",))
    fe_port, prom_port = free_port(), free_port()
    frontend = _spawn(
        [sys.executable, "-m", "dynkv.frontend", "--port", str(fe_port),
         "--deployment", f"p{uuid.uuid4().hex[:6]}", "--model", "m",
         "--tls-cert", cert, "--tls-key", key],
        tmp_path / "frontend.log",
        {ETCD_ENDPOINTS_ENV: etcd_url},
    )  # fmt: skip
    prom = prometheus_service(
        deployment="p", deployment_dir=tmp_path, binary=find_prometheus(), port=prom_port,
        frontend=f"127.0.0.1:{fe_port}", kvbm={}, vllm={}, api_key=None, user=None,
        depends_on=(), frontend_tls_cert=cert,
    )  # fmt: skip
    prepare(prom)  # writes prometheus.yml as the supervisor does
    prometheus = _spawn(prom.argv, tmp_path / "prometheus.log")
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(
            lambda: (_frontend_target(prom_url) or {}).get("lastScrape", "").startswith("2"), 30
        )
        target = _frontend_target(prom_url)
        assert target["scrapeUrl"] == f"https://127.0.0.1:{fe_port}/metrics"
        assert target["health"] == "up", target.get("lastError")
    finally:
        for proc in (prometheus, frontend):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in (prometheus, frontend):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
