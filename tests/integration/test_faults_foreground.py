"""A foreground `dynkv up` that loses its terminal or its reader stops what it started.

Expected behaviour, asserted with a real foreground `up` (etcd, NATS, the worker wrapper with the
fake vLLM, the frontend):
- SIGHUP (the terminal was closed) tears down like SIGTERM and Ctrl-C: `up` exits 130 and no
  process of the deployment is left (pid + create_time, process groups, DYNKV_INSTANCE marker),
  and the state file is gone;
- the reader of its stdout goes away (`dynkv up | head` after head exited): `up` notices within a
  few seconds, even with no log line to write, stops everything and exits 1 without a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_support import descendants, still_running
from infra_helpers import fake_vllm_values

from dynkv.supervisor import processes_left, read_state

pytestmark = pytest.mark.integration
NAME = "fg"
FOREGROUND = (
    "import sys, dynkv.plan.worker as w; w.VLLM_MODULE = 'fake_vllm'; "
    "from dynkv.cli.main import main; sys.argv[0] = 'dynkv'; main()"
)


@pytest.fixture
def env(tmp_path, monkeypatch):
    values = fake_vllm_values(monkeypatch, tmp_path, NAME)
    return values


def start_foreground(env, **popen) -> tuple[subprocess.Popen, list, set[int]]:
    """A foreground `up`, once every service is healthy: (process, its state's services, every
    pid seen in its tree)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, "up", "--skip-checks", "--model", env["MODEL"]],
        env=dict(os.environ),
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    ddir = Path(env["DDIR"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = read_state(ddir) if ddir.is_dir() else None
        if state is not None and state.phase == "running":
            break
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("up did not get healthy in time")
    time.sleep(0.5)
    seen = descendants(proc.pid)
    for record in state.services:
        seen |= {record.pid} | descendants(record.pid)
    return proc, state.services, seen


def assert_all_gone(proc, services, seen, env) -> None:
    ddir = Path(env["DDIR"])
    assert still_running(seen) == []
    assert processes_left(services, ddir) == []
    assert not (ddir / "state.json").exists()


def test_sighup_stops_everything(env):
    proc, services, seen = start_foreground(env, stdout=subprocess.DEVNULL)
    try:
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert_all_gone(proc, services, seen, env)


def test_closed_stdout_stops_everything(env):
    proc, services, seen = start_foreground(env, stdout=subprocess.PIPE)
    try:
        proc.stdout.close()  # the reader is gone; the services may write nothing for a while
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err and "stdout was closed" in err
    assert_all_gone(proc, services, seen, env)
