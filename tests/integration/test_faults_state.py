"""Faults around the deployment's own bookkeeping: a stale or damaged state dir, and SIGTERM while
`dynkv up` is still starting services.

Expected behaviour, written down per test and asserted:
- a state file that is not a state (garbage, or valid JSON of another shape): `status` and `logs`
  exit 1 with one `error:` line and a `fix:` naming `dynkv down` — no traceback; `down` removes
  it and still stops every process the run marked (they carry its DYNKV_INSTANCE);
- a stale state whose recorded pid now belongs to an unrelated process (pid reuse after a crash
  or a reboot): `status` reports it not running, `down` never signals that process, and the next
  `up` starts normally over the stale state;
- SIGTERM to `dynkv up` (foreground or `-d`) while a service is still starting: `up` exits 130
  within seconds and nothing it started is left — every process that was ever in its process
  tree is gone (psutil), nothing carries the run's marker, and there is no state file;
- SIGKILL to `dynkv up` while starting (it cannot clean up): what it started keeps running, but
  the state file written after each start names it — `dynkv status` shows the run as
  `starting`, a new `up` refuses with the `dynkv down` fix, and `dynkv down` stops all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fault_support import descendants, still_running
from infra_helpers import fake_vllm_values
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.supervisor import read_state
from dynkv.supervisor.process import marked_processes, marker_prefix

pytestmark = pytest.mark.integration
runner = CliRunner()
NAME = "stale"


@pytest.fixture
def env(tmp_path, monkeypatch):
    values = fake_vllm_values(monkeypatch, tmp_path, NAME)
    yield values
    runner.invoke(app, ["down", "--timeout", "2"])


def sleeper(env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def no_traceback(result) -> str:
    out = (result.stdout or "") + (result.stderr or "")
    assert (
        "Traceback" not in out
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    ), out
    return result.stderr


@pytest.mark.parametrize("content", ["garbage{", "[]", '"abc"', '{"services": [1]}'])
def test_a_state_file_that_is_not_a_state(env, content):
    ddir = Path(env["DDIR"])
    ddir.mkdir(parents=True)
    (ddir / "state.json").write_text(content)
    survivor = sleeper({"DYNKV_INSTANCE": marker_prefix(ddir) + "crashed-run"})
    try:
        for command in (["status", "--json"], ["logs"]):
            result = runner.invoke(app, command)
            err = no_traceback(result)
            assert result.exit_code == 1, result.output
            assert "error:" in err and "unreadable" in err and f"dynkv down --name {NAME}" in err
        down = runner.invoke(app, ["down", "--timeout", "2"])
        assert down.exit_code == 0 and "removed an unreadable state file" in down.stderr
        assert survivor.wait(10) is not None  # the marked process was stopped too
        assert not (ddir / "state.json").exists()
    finally:
        if survivor.poll() is None:
            survivor.kill()


def test_a_stale_state_naming_a_reused_pid(env):
    """The state of a crashed run; its worker's pid now belongs to someone else's process."""
    ddir = Path(env["DDIR"])
    ddir.mkdir(parents=True)
    stranger = sleeper()  # not ours: no DYNKV_INSTANCE marker
    try:
        record = {
            "name": "worker",
            "role": "agg",
            "pid": stranger.pid,
            "pgid": stranger.pid,
            "create_time": psutil.Process(stranger.pid).create_time() - 1000,  # another process
            "ports": {"http": int(env["DYNKV_WORKER_PORT"])},
            "log": str(ddir / "logs" / "worker.log"),
            "meta": {"metrics_url": "http://127.0.0.1:1/metrics", "url": "http://127.0.0.1:1"},
        }
        state = {
            "name": NAME,
            "instance": marker_prefix(ddir) + "old",
            "infra": "embedded",
            "phase": "running",
            "mode": "detached",
            "services": [record],
        }
        (ddir / "etcd-data").mkdir()
        (ddir / "state.json").write_text(json.dumps(state))
        status = runner.invoke(app, ["status", "--json"])
        no_traceback(status)
        worker = json.loads(status.stdout)["services"][0]
        assert status.exit_code == 1 and worker["running"] is False

        up = runner.invoke(app, ["up", "-d", "--skip-checks", "--model", env["MODEL"]])
        assert up.exit_code == 0, up.output  # the stale state was cleaned, not blamed
        assert stranger.poll() is None  # and the stranger was left alone
        assert read_state(ddir).phase == "running"
        assert runner.invoke(app, ["down", "--timeout", "2"]).exit_code == 0
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(5)


def test_a_state_written_by_a_newer_dynkv_is_read_and_down_stops_its_processes(env):
    """Keys this dynkv does not know, at the top level and in a service, and a readiness check of
    a kind it does not know: `status` reads the state and `down` stops the recorded process (it
    carries no marker, so only the state leads to it) instead of discarding the state."""
    ddir = Path(env["DDIR"])
    ddir.mkdir(parents=True)
    service = sleeper()  # no DYNKV_INSTANCE: found through the state file only
    try:
        record = {
            "name": "router",
            "role": "router",
            "pid": service.pid,
            "pgid": service.pid,
            "create_time": psutil.Process(service.pid).create_time(),
            "log": str(ddir / "logs" / "router.log"),
            "probes": [{"kind": "grpc", "target": "127.0.0.1:1"}],
            "meta": {"url": "http://127.0.0.1:1", "shard": "3"},
            "restart_policy": {"max": 3},  # a field of a later version
        }
        state = {
            "name": NAME,
            "instance": marker_prefix(ddir) + "newer",
            "infra": "embedded",
            "phase": "running",
            "mode": "detached",
            "services": [record],
            "version": 2,
            "fleet": {"nodes": ["a", "b"]},
        }
        (ddir / "state.json").write_text(json.dumps(state))
        status = runner.invoke(app, ["status", "--json"])
        no_traceback(status)
        (router,) = json.loads(status.stdout)["services"]
        assert router["running"] is True and router["url"] == "http://127.0.0.1:1"
        assert "does not know" in router["detail"]

        down = runner.invoke(app, ["down", "--timeout", "2"])
        assert down.exit_code == 0, down.output
        assert "unreadable" not in down.stderr
        assert service.wait(10) is not None  # stopped through its record
        assert not (ddir / "state.json").exists()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(5)


FOREGROUND = (
    "import sys, dynkv.plan.worker as w; w.VLLM_MODULE = 'fake_vllm'; "
    "from dynkv.cli.main import main; sys.argv[0] = 'dynkv'; main()"
)


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_sigterm_while_starting_leaves_nothing(env, detach):
    ddir = Path(env["DDIR"])
    args = ["up", "--skip-checks", "--model", env["MODEL"], *(["-d"] if detach else [])]
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, *args],
        env={**os.environ, "FAKE_VLLM_READY_AFTER": "60"},  # the worker never gets ready
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the worker and its fake vLLM run
            seen |= descendants(proc.pid)
            state = read_state(ddir) if ddir.is_dir() else None
            names = [s.name for s in state.services] if state else []
            if "worker" in names and len(descendants(state.service("worker").pid)) >= 1:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert state is not None and state.phase == "starting", names
        time.sleep(0.3)
        seen |= descendants(proc.pid)
        for record in state.services:
            seen |= {record.pid} | descendants(record.pid)
        assert len(seen) >= 4, seen  # etcd, nats, the wrapper and the fake vLLM at least
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert still_running(seen) == []
    assert marked_processes(marker_prefix(ddir)) == []
    assert read_state(ddir) is None


def test_sigkill_while_starting_is_cleaned_by_down(env):
    ddir = Path(env["DDIR"])
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, "up", "-d", "--skip-checks", "--model", env["MODEL"]],
        env={**os.environ, "FAKE_VLLM_READY_AFTER": "60"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen |= descendants(proc.pid)
            state = read_state(ddir) if ddir.is_dir() else None
            if state and "worker" in [s.name for s in state.services]:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        seen |= descendants(proc.pid)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert still_running(seen)  # nobody stopped them
    status = runner.invoke(app, ["status", "--json"])
    no_traceback(status)
    assert status.exit_code == 1 and json.loads(status.stdout)["phase"] == "starting"
    again = runner.invoke(app, ["up", "-d", "--skip-checks", "--model", env["MODEL"]])
    assert again.exit_code == 1 and f"dynkv down --name {NAME}" in again.stderr
    down = runner.invoke(app, ["down", "--timeout", "1"])  # orphans: init reaps them late
    assert down.exit_code == 0, down.output
    assert still_running(seen) == []
    assert marked_processes(marker_prefix(ddir)) == [] and read_state(ddir) is None
