"""`dynkv advise` against a running worker: a real process serving the runtime's own KVBM metrics
registry over HTTP, recorded in a real state file, read twice over a window. The worker process
stands in for vLLM (which this test does not start): it counts what a G2 too small for its
working set with the SSD filter on would count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from dynkv.plan.model import ServiceInfo
from dynkv.ports import free_port
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore

WORKER = textwrap.dedent(
    """
    import sys, time
    from dynkv.kvbm.counters import Count
    from dynkv.kvbm.metrics import KvbmMetrics
    m = KvbmMetrics()
    m.bind_capacity(lambda: 1000, 1000, lambda: 500, 2000)
    m.serve("127.0.0.1", int(sys.argv[1]))
    while True:  # 40 blocks asked per tick, 10 recomputed after G2 evicted them unwritten to G3
        m.record_request(40, 10, 0)
        m.count(Count.OFFLOAD_D2H, 30)
        m.count(Count.HOST_EVICTED, 30)
        m.count(Count.REUSE_AFTER_EVICT_RECOMPUTED, 10)
        m.count(Count.FILTER_STARVED, 10)
        time.sleep(0.05)
    """
)


def dynkv(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def env(tmp_path):
    out = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_KVBM_", "DYNKV_"))}
    out["DYNKV_STATE_DIR"] = str(tmp_path / "state")
    return out


def wait_served(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=0.5).raise_for_status()
            return
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{url} not served"
            time.sleep(0.1)


def write_state(tmp_path, services: list[tuple[str, str, subprocess.Popen, ServiceInfo]]) -> None:
    """Deployment `dev`'s state file, recording each (name, role, process, info) as running."""
    store = StateStore(tmp_path / "state" / "dev")
    state = DeploymentState(name="dev", instance="t#1", infra="embedded", phase="running")
    for name, role, proc, info in services:
        create_time = psutil.Process(proc.pid).create_time()
        state.services.append(
            ServiceRecord(name=name, role=role, pid=proc.pid, create_time=create_time, info=info)
        )
    with store.lock():
        store.write(state)


@pytest.fixture
def worker(tmp_path, env):
    port = free_port()
    wenv = {**env, "DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "8"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(port)], env=wenv)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_served(url, proc)
    write_state(tmp_path, [("worker", "agg", proc, ServiceInfo(metrics_url=url))])
    yield proc
    proc.terminate()
    proc.wait(10)


def test_advise_reads_the_window_and_names_the_filter_and_g2_size(worker, env):
    result = dynkv("advise", "--name", "dev", "--json", "--window", "1", env=env)
    assert result.returncode == 0, result.stderr
    advice = json.loads(result.stdout)
    found = {f["kind"]: f for f in advice["findings"]}
    assert set(found) == {"g2_thrash", "filter_starves_g3"}
    # the settings came from the worker's own environment, not this shell's
    assert found["g2_thrash"]["change"][0]["env"] == "DYN_KVBM_CPU_CACHE_GB"
    assert found["g2_thrash"]["change"][0]["value"] == "8"
    assert found["filter_starves_g3"]["change"][0] == {
        "env": "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER",
        "value": "true",
        "profile_key": "[kvbm] disable_disk_offload_filter",
        "flag": None,
    }
    (w,) = advice["workers"]
    assert w["lookup_blocks"] > 0 and not w["prefill_seconds_saved"]  # nothing measured saved

    text = dynkv("advise", "--name", "dev", "--window", "1", env=env)
    assert text.returncode == 0, text.stderr
    assert "filter_starves_g3 [worker]" in text.stdout
    assert "change: DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER=true" in text.stdout


def test_advise_without_a_running_deployment_is_a_usage_error(env):
    result = dynkv("advise", "--name", "nothing", "--window", "1", env=env)
    assert result.returncode == 2
    assert "no running deployment named 'nothing'" in result.stderr
    assert "dynkv up --name nothing" in result.stderr


FRONTEND = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    reads = [0]
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass
        def do_GET(self):  # each read: 4 more round-robin turns, 40 new blocks, 15 held twice
            reads[0] += 1
            n = reads[0]
            body = (
                "# TYPE dynkv_router_decisions_total counter\\n"
                f'dynkv_router_decisions_total{{policy="round_robin",reason="turn"}} {4 * n}\\n'
                "# TYPE dynkv_router_acquired_blocks_total counter\\n"
                f'dynkv_router_acquired_blocks_total{{worker="agg-0"}} {20 * n}\\n'
                f'dynkv_router_acquired_blocks_total{{worker="agg-1"}} {20 * n}\\n'
                "# TYPE dynkv_router_duplicated_blocks_total counter\\n"
                f'dynkv_router_duplicated_blocks_total{{worker="agg-1"}} {15 * n}\\n'
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            self.wfile.write(body)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


@pytest.fixture
def fleet_without_kvbm(tmp_path, env):
    """Two live `--no-kvbm` workers (no KVBM metrics endpoint: processes that only sleep) behind
    a frontend process whose /metrics counts what round robin duplicates."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FRONTEND, str(port)], env=env)]
    procs += [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in "ab"
    ]
    url = f"http://127.0.0.1:{port}"
    wait_served(f"{url}/metrics", procs[0])
    write_state(
        tmp_path,
        [
            ("worker-0", "agg", procs[1], ServiceInfo(worker_id="agg-0")),
            ("worker-1", "agg", procs[2], ServiceInfo(worker_id="agg-1")),
            ("frontend", "frontend", procs[0], ServiceInfo(url=url)),
        ],
    )
    yield
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_a_fleet_without_kvbm_has_its_router_judged(fleet_without_kvbm, env):
    result = dynkv("advise", "--name", "dev", "--json", "--window", "1", env=env)
    assert result.returncode == 0, result.stderr
    advice = json.loads(result.stdout)
    (finding,) = advice["findings"]
    assert finding["kind"] == "router_spreads_prefixes" and finding["worker"] is None
    # read at the start, halfway and at the end: 40 new blocks, 15 held twice, in each half
    assert finding["evidence"]["computed_while_held_elsewhere"] == 30
    assert finding["evidence"]["computed_blocks"] == 80
    assert finding["evidence"]["first_half_share"] == finding["evidence"]["second_half_share"]
    assert finding["change"][0]["env"] == "DYNKV_ROUTER"
    assert advice["workers"] == [] and "only the router is judged" in advice["notes"][0]

    text = dynkv("advise", "--name", "dev", "--window", "1", env=env)
    assert text.returncode == 0, text.stderr
    assert "reading the router of 2 worker(s) of dev" in text.stderr
    assert (
        "change: DYNKV_ROUTER=kv | [deployment] router = kv | dynkv up --router kv" in text.stdout
    )
