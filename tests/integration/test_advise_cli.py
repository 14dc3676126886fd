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


@pytest.fixture
def worker(tmp_path, env):
    port = free_port()
    wenv = {**env, "DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "8"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(port)], env=wenv)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=0.5).raise_for_status()
            break
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, "worker did not serve"
            time.sleep(0.1)
    store = StateStore(tmp_path / "state" / "dev")
    state = DeploymentState(name="dev", instance="t#1", infra="embedded", phase="running")
    state.services.append(
        ServiceRecord(
            name="worker",
            role="agg",
            pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(),
            info=ServiceInfo(metrics_url=url),
        )
    )
    with store.lock():
        store.write(state)
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
