"""Restart on failure with real processes (etcd and a small python service; the worker wrapper
with the fake vLLM): a service that keeps failing is restarted with back-off until the limit and
then stays down while the rest serves; the background supervisor of `up -d` restarts a SIGKILLed
service, `dynkv restart` reaches it, and `dynkv down` leaves nothing; a SIGKILLed worker wrapper
comes back without its orphaned vLLM, registered again, and serves (docs/restart.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from infra_helpers import assert_nothing_left, infra_plan, use_fake_vllm, wait_for
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.etcd_client import EtcdClient
from dynkv.plan import Service, TcpProbe
from dynkv.ports import free_port
from dynkv.private_deployment import dynkv_cli
from dynkv.supervisor import Supervisor, read_state, stop_deployment
from dynkv.supervisor.background import start_in_background
from dynkv.supervisor.restart_policy import RestartPolicy

pytestmark = pytest.mark.integration

SERVE = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "print('exiting', flush=True); sys.exit(4)\n"
)
FAST = RestartPolicy(limit=2, window=60, initial_delay=0.2, max_delay=0.4)


def service(name: str, plan, lifetime: float) -> Service:
    port = free_port()
    return Service(
        name=name,
        role="test",
        argv=(sys.executable, "-c", SERVE, str(port), str(lifetime)),
        cwd=plan.deployment_dir,
        ports={"tcp": port},
        probes=(TcpProbe(host="127.0.0.1", port=port),),
        depends_on=("etcd",),
        log_file=f"{plan.deployment_dir}/logs/{name}.log",
    )


def etcd_and(env, name: str, lifetime: float):
    plan = infra_plan(env)
    return plan.replace(services=(plan.services[0], service(name, plan, lifetime)))


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_failing_service_is_restarted_up_to_the_limit_then_stays_down(env):
    plan = etcd_and(env, "flaky", lifetime=0.5)
    sup = Supervisor(plan, poll_interval=0.1, restart=FAST)
    said: list[str] = []
    sup.restarter.log = said.append
    sup.start(detach=False)
    pids = [(r.pid, r.create_time) for r in sup.state.services]
    result = []
    watcher = threading.Thread(target=lambda: result.append(sup.watch(lambda *_: None)))
    watcher.start()
    try:
        rec = wait_for(
            lambda: (
                (r := read_state(plan.deployment_dir).service("flaky")).restart_phase == "given_up"
                and r
            ),
            timeout=60,
        )
        pids += [(h.record.pid, h.record.create_time) for h in sup.handles]
        assert rec.restarts == 2  # the limit, then it stays down
        assert rec.last_exit.code == 4 and rec.last_exit.signal is None
        assert any("restarting it in 0.2 s (restart 1 of 2" in line for line in said)
        assert any("restarting it in 0.4 s (restart 2 of 2" in line for line in said)
        assert any("stays down: 2 restarts within 60 s" in line for line in said)
        # the rest keeps serving, and the log kept every run's lines
        etcd = read_state(plan.deployment_dir).service("etcd")
        assert psutil.pid_exists(etcd.pid) and etcd.restarts == 0
        log = Path(rec.log).read_text()
        assert log.count("listening") == 3 and log.count("exiting") == 3
        assert not result, "the foreground run must not stop everything"
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
        watcher.join(timeout=30)
    assert result and result[0].reason == "removed"
    sup.stop()
    assert_nothing_left(pids, plan.deployment_dir)


def test_the_background_supervisor_restarts_a_killed_service_and_takes_requests(env):
    plan = etcd_and(env, "svc", lifetime=600)
    port = plan.service("svc").ports["tcp"]
    sup = Supervisor(plan, poll_interval=0.1, restart=FAST)
    state = start_in_background(sup)
    keeper = state.supervisor_pid
    pids = [(r.pid, r.create_time) for r in state.services]
    try:
        assert state.mode == "detached" and keeper not in (None, os.getpid())
        assert psutil.Process(keeper).ppid() == os.getpid()  # forked: the services' parent
        assert psutil.Process(state.service("svc").pid).ppid() == keeper

        os.kill(state.service("svc").pid, signal.SIGKILL)
        rec = wait_for(
            lambda: (
                (r := read_state(plan.deployment_dir).service("svc")).restarts == 1
                and r.restart_phase == ""
                and r
            ),
            timeout=30,
        )
        pids.append((rec.pid, rec.create_time))
        assert rec.last_exit.signal == signal.SIGKILL and rec.last_exit.code is None
        assert 0 < rec.recovered_after_s < 20 and answers(port)

        cli_env = {**os.environ, **env}
        bad = dynkv_cli("restart", "nosuch", env=cli_env)
        assert bad.returncode == 2, bad.stderr
        assert "nosuch" in bad.stderr and "etcd, svc" in bad.stderr

        done = dynkv_cli("restart", "svc", "--timeout", "60", env=cli_env)
        assert done.returncode == 0, done.stderr
        assert "svc restarted" in done.stderr
        rec = read_state(plan.deployment_dir).service("svc")
        pids.append((rec.pid, rec.create_time))
        assert rec.restarts == 2 and answers(port)

        shown = dynkv_cli("status", "--json", env=cli_env)
        svc = next(s for s in json.loads(shown.stdout)["services"] if s["name"] == "svc")
        assert svc["restarts"] == 2 and svc["last_exit"]["describe"] == "killed by SIGKILL"
        assert json.loads(shown.stdout)["supervisor_pid"] == keeper

        down = dynkv_cli("down", env=cli_env)
        assert down.returncode == 0 and "svc" in down.stderr, down.stderr
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    wait_for(lambda: not psutil.pid_exists(keeper) or _reaped(keeper), timeout=30)
    assert_nothing_left(pids, plan.deployment_dir)


SLOW_START = (
    "import socket, sys, time\n"
    "time.sleep(1.5)  # loading, as a vLLM engine does before it answers\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)\n"
)


def test_a_rolling_restart_stops_each_service_after_the_one_before_is_back(env):
    """`dynkv restart --rolling`: one worker at a time, so the others keep serving: the second
    is started again only once the first answers, 1.5 s after its own start."""
    plan = infra_plan(env)
    slow = [
        service(name, plan, 600).replace(
            argv=(sys.executable, "-c", SLOW_START, str(port := free_port())),
            ports={"tcp": port},
            probes=(TcpProbe(host="127.0.0.1", port=port),),
        )
        for name in ("a", "b")
    ]
    plan = plan.replace(services=(plan.services[0], *slow))
    state = start_in_background(Supervisor(plan, poll_interval=0.1, restart=FAST))
    pids = [(r.pid, r.create_time) for r in state.services]
    cli_env = {**os.environ, **env}
    try:
        refused = dynkv_cli("restart", "a", "b", "--rolling", "--no-wait", env=cli_env)
        assert refused.returncode == 2 and "--rolling" in refused.stderr, refused.stderr
        done = dynkv_cli("restart", "a", "b", "--rolling", "--json", env=cli_env)
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)["restarted"]) == {"a", "b"}
        after = read_state(plan.deployment_dir)
        a, b = after.service("a"), after.service("b")
        pids += [(a.pid, a.create_time), (b.pid, b.create_time)]
        assert a.restarts == b.restarts == 1
        assert b.started_at >= a.started_at + 1.5  # b stopped only once a answered again
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    wait_for(lambda: not psutil.pid_exists(state.supervisor_pid) or _reaped(state.supervisor_pid))
    assert_nothing_left(pids, plan.deployment_dir)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def _registration(env: dict[str, str], name: str) -> dict | None:
    with EtcdClient(f"http://127.0.0.1:{env['DYNKV_ETCD_PORT']}", timeout=2) as etcd:
        kvs = etcd.get_prefix(f"/dynkv/{name}/workers/").kvs
    return kvs[0].json() if len(kvs) == 1 else None


def test_a_killed_worker_wrapper_comes_back_registered_and_serving(tmp_path, monkeypatch):
    env, model = use_fake_vllm(monkeypatch, tmp_path, "rst", DYNKV_LEASE_TTL_SECS="2")
    runner = CliRunner()
    up = runner.invoke(app, ["up", "-d", "--skip-checks", "--model", str(model)])
    assert up.exit_code == 0, up.output
    ddir = tmp_path / "state" / "rst"
    state = read_state(ddir)
    pids = [(r.pid, r.create_time) for r in state.services]
    url = f"http://127.0.0.1:{env['DYNKV_FRONTEND_PORT']}/v1/completions"
    body = {"model": "model", "prompt": "hi", "max_tokens": 4}
    try:
        worker = state.service("worker")
        orphans = psutil.Process(worker.pid).children(recursive=True)  # the fake vLLM
        assert orphans
        registered = _registration(env, "rst")
        assert registered is not None

        os.kill(worker.pid, signal.SIGKILL)  # the wrapper alone: its vLLM is orphaned
        rec = wait_for(
            lambda: (
                (r := read_state(ddir).service("worker")).restarts == 1
                and r.restart_phase == ""
                and r
            ),
            timeout=60,
        )
        pids.append((rec.pid, rec.create_time))
        assert rec.last_exit.signal == signal.SIGKILL
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)
        again = wait_for(lambda: _registration(env, "rst"), timeout=10)
        assert again != registered and again["pid"] != registered["pid"]
        resp = wait_for(
            lambda: (r := httpx.post(url, json=body, timeout=10)).status_code == 200 and r,
            timeout=15,
        )
        assert resp.json()["choices"]
    finally:
        down = runner.invoke(app, ["down", "--timeout", "3"])
    assert down.exit_code == 0, down.output
    assert_nothing_left(pids, ddir)


def test_restart_without_a_supervisor_says_how_to_get_one(env):
    plan = infra_plan(env)
    plan = plan.replace(services=plan.services[:1])
    state = Supervisor(plan).start(detach=True)  # no background supervisor: nobody to ask
    try:
        result = dynkv_cli("restart", "etcd", env={**os.environ, **env})
        assert result.returncode == 1, result.stderr
        assert "no supervisor runs deployment 'it'" in result.stderr
        assert "dynkv up -d --name it" in result.stderr
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    assert_nothing_left([(r.pid, r.create_time) for r in state.services], plan.deployment_dir)
