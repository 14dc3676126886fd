"""`dynkv up -d` with the generated tiny model on real vLLM (CPU), through the CLI as a user runs
it: worker registered in etcd and serving through the bundled KVBM connector → `status --json`
→ `logs worker` → `down` → nothing left."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynkv.infra.etcd_client import EtcdClient
from dynkv.ports import free_port
from dynkv.supervisor import read_state
from dynkv.supervisor.process import group_of, marked_processes, same_process
from dynkv.supervisor.runner import marker_prefix


def _missing_parts() -> str | None:
    for module in ("dynkv.model", "dynkv.kvbm.vllm_connector"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable yet (lands on main; merge it to run this test)"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(_missing_parts() is not None, reason=_missing_parts() or ""),
]


def dynkv(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynkv.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    base = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("DYN_KVBM_", "DYNKV_"))
    }
    return base | {
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # the tiny model and G3 stay in the test
        "DYNKV_STATE_DIR": str(tmp_path / "state"),
        "DYNKV_NAME": "e2e",
        "DYNKV_DEVICE": "cpu",
        "DYNKV_PROFILE": "gpu-cpu-disk",
        "DYN_KVBM_CPU_CACHE_GB": "0.1",
        "DYN_KVBM_DISK_CACHE_GB": "0.2",
        "DYNKV_DEVICE_KV_GB": "0.1",
        "DYNKV_MAX_MODEL_LEN": "2048",
        "DYNKV_STARTUP_TIMEOUT_SECS": "240",
        "DYNKV_ETCD_PORT": str(free_port()),
        "DYNKV_ETCD_PEER_PORT": str(free_port()),
        "DYNKV_NATS_PORT": str(free_port()),
        "DYNKV_NATS_MONITOR_PORT": str(free_port()),
        "DYNKV_WORKER_PORT": str(free_port()),
        "DYNKV_FRONTEND_PORT": str(free_port()),
        "DYN_KVBM_METRICS_PORT": str(free_port()),
    }


def test_up_tiny_model_status_logs_down(env):
    ddir = Path(env["DYNKV_STATE_DIR"]) / "e2e"
    started = time.monotonic()
    up = dynkv("up", "-d", env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        assert "random weights" in up.stderr
        print(f"dynkv up -d: {time.monotonic() - started:.1f} s")
        state = read_state(ddir)
        assert [s.name for s in state.services] == ["etcd", "nats", "worker", "frontend"]

        with EtcdClient(f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}") as etcd:
            record = etcd.get("/dynkv/e2e/workers/agg-0").json()
        assert record["model"] == "dynkv-tiny"
        assert record["url"] == f"http://127.0.0.1:{env['DYNKV_WORKER_PORT']}"

        from openai import OpenAI

        client = OpenAI(base_url=record["url"] + "/v1", api_key="unused")
        prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
        for _ in range(2):  # the second request can reuse the first one's KV blocks
            done = client.completions.create(model="dynkv-tiny", prompt=prompt, max_tokens=4)
            assert done.choices[0].text is not None

        status = dynkv("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["name"] == "e2e" and all(s["healthy"] for s in data["services"])
        worker = next(s for s in data["services"] if s["name"] == "worker")
        assert worker["kvbm"]["reachable"] is True, worker["kvbm"]

        logs = dynkv("logs", "worker", "--tail", "200", env=env)
        assert logs.returncode == 0 and "worker | " in logs.stdout
        assert "registered /dynkv/e2e/workers/agg-0" in logs.stdout
    finally:
        down = dynkv("down", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    leftovers = [s.pid for s in state.services if same_process(s.pid, s.create_time)]
    assert leftovers == []
    # vLLM's engine processes rename themselves (setproctitle), hiding the DYNKV_INSTANCE
    # marker: they are found by their process group, which must be empty too.
    assert [p.pid for s in state.services if s.pgid for p in group_of(s.pgid)] == []
    assert marked_processes(marker_prefix(ddir)) == []
