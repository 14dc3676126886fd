"""The supervisor with real etcd and NATS (and small python services), on ephemeral ports with a
private state dir: start-up, the state file, failures, stale state, teardown leaving nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time

import psutil
import pytest
from doctor_support import plan_check
from infra_helpers import assert_nothing_left, full_plan, infra_plan, port_env

from dynkv.doctor import Status
from dynkv.plan import Service, TcpProbe
from dynkv.ports import free_port
from dynkv.settings import resolve
from dynkv.supervisor import (
    AlreadyRunning,
    StartFailed,
    StateStore,
    Supervisor,
    deployment_status,
    live_detail,
    read_state,
    stop_deployment,
)
from dynkv.supervisor.state import INSTANCE_ENV, ServiceRecord
from dynkv.supervisor.teardown import stop_waves

pytestmark = pytest.mark.integration

LISTEN = (
    "import socket, sys, time, os, subprocess\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "if len(sys.argv) > 3: subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "print('exiting', flush=True); sys.exit(4)\n"
)


def listener(name: str, plan, *, lifetime: float = 600, orphan: bool = False, deps=("etcd",)):
    """A python service that becomes healthy (tcp) and exits with code 4 after `lifetime` s."""
    port = free_port()
    argv = [sys.executable, "-c", LISTEN, str(port), str(lifetime)] + (["orphan"] if orphan else [])
    return Service(
        name=name,
        role="test",
        argv=tuple(argv),
        cwd=plan.deployment_dir,
        ports={"tcp": port},
        probes=(TcpProbe(host="127.0.0.1", port=port),),
        depends_on=deps,
        log_file=f"{plan.deployment_dir}/logs/{name}.log",
    )


def pids_of(state) -> list[tuple[int, float]]:
    return [(s.pid, s.create_time) for s in state.services if s.pid]


def test_detached_infra_is_healthy_with_a_complete_private_state(env):
    plan = infra_plan(env)
    t0 = time.monotonic()
    state = Supervisor(plan).start(detach=True)
    # etcd and NATS are healthy in about a second; the bound only says nothing waited for a probe
    # timeout, with room for a loaded 2-core box
    assert time.monotonic() - t0 < 60

    store = StateStore(plan.deployment_dir)
    on_disk = json.loads(store.path.read_text())
    assert on_disk["name"] == "it" and on_disk["phase"] == "running"
    assert on_disk["mode"] == "detached" and on_disk["supervisor_pid"] is None
    assert on_disk["instance"].startswith(str(store.dir.resolve()) + "#")
    etcd, nats = on_disk["services"]
    for rec, svc in ((etcd, plan.services[0]), (nats, plan.services[1])):
        proc = psutil.Process(rec["pid"])
        assert rec["pgid"] == rec["pid"] == os.getpgid(rec["pid"])  # own session
        assert os.getsid(rec["pid"]) == rec["pid"]
        assert rec["create_time"] == pytest.approx(proc.create_time(), abs=0.05)
        assert rec["ports"] == dict(svc.ports)
        assert rec["argv"] == list(svc.argv)
        assert rec["log"] == svc.log_file and os.path.getsize(rec["log"]) > 0
        assert proc.environ()[INSTANCE_ENV] == on_disk["instance"]
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(etcd["log"]).st_mode) == 0o600
    assert os.path.isdir(f"{plan.deployment_dir}/etcd-data")

    report = deployment_status(plan.deployment_dir)
    assert report.healthy and [s.name for s in report.services] == ["etcd", "nats"]

    stopped = stop_deployment(plan.deployment_dir, grace=5)
    assert stopped.found and stopped.stopped == ["nats", "etcd"] and stopped.killed == 0
    assert_nothing_left(pids_of(state), plan.deployment_dir)
    assert not store.path.exists()
    assert not os.path.exists(f"{plan.deployment_dir}/etcd-data")
    assert os.path.getsize(etcd["log"]) > 0  # logs stay for a post-mortem
    again = stop_deployment(plan.deployment_dir, grace=5)  # idempotent
    assert not again.found


def test_a_killed_service_is_reported_by_status(env):
    plan = infra_plan(env)
    state = Supervisor(plan).start(detach=True)
    try:
        os.killpg(state.service("nats").pgid, signal.SIGKILL)
        time.sleep(0.3)
        report = deployment_status(plan.deployment_dir)
        by_name = {s.name: s for s in report.services}
        assert by_name["etcd"].healthy and not by_name["nats"].running
        assert not by_name["nats"].healthy and by_name["nats"].detail == "not running"
        assert not report.healthy
        assert live_detail(read_state(plan.deployment_dir)) == "running: etcd"
    finally:
        stop_deployment(plan.deployment_dir, grace=5)
    assert_nothing_left(pids_of(state), plan.deployment_dir)


def test_stale_state_of_a_crashed_run_is_cleaned_by_the_next_up(env):
    plan = infra_plan(env)
    first = Supervisor(plan).start(detach=True)
    for rec in first.services:  # the whole deployment crashes (SIGKILL, no cleanup)
        os.killpg(rec.pgid, signal.SIGKILL)
    time.sleep(0.3)
    assert live_detail(read_state(plan.deployment_dir)) is None  # stale
    second = Supervisor(plan).start(detach=True)
    assert second.instance != first.instance
    assert deployment_status(plan.deployment_dir).healthy
    stop_deployment(plan.deployment_dir, grace=5)
    assert_nothing_left(pids_of(first) + pids_of(second), plan.deployment_dir)


def test_stale_state_is_cleaned_by_down(env):
    plan = infra_plan(env)
    state = Supervisor(plan).start(detach=True)
    for rec in state.services:
        os.killpg(rec.pgid, signal.SIGKILL)
    time.sleep(0.3)
    report = stop_deployment(plan.deployment_dir, grace=5)
    assert report.found and not StateStore(plan.deployment_dir).exists()


def test_a_running_deployment_is_not_started_twice(env):
    plan = infra_plan(env)
    state = Supervisor(plan).start(detach=True)
    try:
        with pytest.raises(AlreadyRunning, match="running: etcd, nats"):
            Supervisor(plan).start(detach=True)
        assert read_state(plan.deployment_dir).instance == state.instance  # untouched
    finally:
        stop_deployment(plan.deployment_dir, grace=5)


def test_a_service_failing_at_startup_fails_up_with_its_log_and_leaves_nothing(env):
    plan = infra_plan(env)
    failing = Service(
        name="broken",
        role="test",
        argv=(
            sys.executable,
            "-c",
            "import sys; print('loading model'); print('boom: no GPU', file=sys.stderr); sys.exit(3)",
        ),
        cwd=plan.deployment_dir,
        probes=(TcpProbe(host="127.0.0.1", port=free_port()),),
        depends_on=("etcd", "nats"),
        log_file=f"{plan.deployment_dir}/logs/broken.log",
    )
    plan = plan.replace(services=plan.services + (failing,))
    sup = Supervisor(plan)
    with pytest.raises(StartFailed) as exc:
        sup.start(detach=True)
    assert exc.value.service == "broken" and "exited with code 3" in exc.value.reason
    assert exc.value.log_tail == ["loading model", "boom: no GPU"]
    started = [(h.record.pid, h.record.create_time) for h in sup.handles]
    assert len(started) == 3
    assert_nothing_left(started, plan.deployment_dir)
    assert not StateStore(plan.deployment_dir).exists()


def test_independent_services_start_together_and_dependents_after_them(env):
    """Prefill and decode workers each load a model for minutes: neither waits for the other,
    and what depends on both (the frontend) starts only once both are healthy."""
    plan = infra_plan(env)
    slow = "import socket, sys, time; time.sleep(1.0); s = socket.socket(); "
    slow += "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"

    def service(name: str, deps: tuple[str, ...]) -> Service:
        port = free_port()
        return Service(
            name=name,
            role="test",
            argv=(sys.executable, "-c", slow, str(port)),
            cwd=plan.deployment_dir,
            probes=(TcpProbe(host="127.0.0.1", port=port),),
            depends_on=deps,
            log_file=f"{plan.deployment_dir}/logs/{name}.log",
        )

    services = (service("front", ("a", "b")), service("a", ()), service("b", ()))
    plan = plan.replace(services=services)
    state = Supervisor(plan, poll_interval=0.05).start(detach=True)
    try:
        started = {s.name: s.started_at for s in state.services}
        assert list(started) == ["a", "b", "front"]
        assert abs(started["a"] - started["b"]) < 0.9  # one after the other: ≥ 1 s apart
        assert started["front"] >= max(started["a"], started["b"]) + 1.0
    finally:
        stop_deployment(plan.deployment_dir, grace=3)
    assert_nothing_left(pids_of(state), plan.deployment_dir)


SLOW_TO_STOP = """
import signal, socket, sys, time
log, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def on_term(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's and the process's own SIGTERM
    with open(log, "a") as f:
        f.write(name + " term\\n")
    time.sleep(0.5)
    with open(log, "a") as f:
        f.write(name + " exit\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
time.sleep(600)
"""


def test_down_stops_a_wave_together_and_dependents_first(env, tmp_path):
    """`down` stops by the start waves reversed: what depends on the others (the frontend) first,
    then the services of one wave (a fleet's workers) together: both are told to stop before
    either has finished, each taking half a second to."""
    plan = infra_plan(env)
    events = tmp_path / "events"

    def service(name: str, deps: tuple[str, ...]) -> Service:
        port = free_port()
        return Service(
            name=name,
            role="test",
            argv=(sys.executable, "-c", SLOW_TO_STOP, str(events), str(port), name),
            cwd=plan.deployment_dir,
            probes=(TcpProbe(host="127.0.0.1", port=port),),
            depends_on=deps,
            log_file=f"{plan.deployment_dir}/logs/{name}.log",
        )

    plan = plan.replace(services=(service("a", ()), service("b", ()), service("front", ("a", "b"))))
    state = Supervisor(plan, poll_interval=0.05).start(detach=True)
    assert [s.depends_on for s in state.services] == [[], [], ["a", "b"]]
    report = stop_deployment(plan.deployment_dir, grace=5)
    assert report.stopped == ["front", "b", "a"] and report.killed == 0
    lines = events.read_text().splitlines()
    assert lines[:2] == ["front term", "front exit"]
    assert sorted(lines[2:4]) == ["a term", "b term"]  # both told before either is done
    assert sorted(lines[4:]) == ["a exit", "b exit"]
    assert_nothing_left(pids_of(state), plan.deployment_dir)


def test_a_state_without_dependencies_stops_one_service_at_a_time():
    """A state file written before dynkv recorded `depends_on` keeps the old order."""
    old = [ServiceRecord(name=n, role="test") for n in ("etcd", "nats", "worker")]
    assert stop_waves(old) == [[old[2]], [old[1]], [old[0]]]
    new = [
        ServiceRecord(name="etcd", role="etcd", depends_on=[]),
        ServiceRecord(name="w0", role="agg", depends_on=["etcd", "gone"]),  # gone: not recorded
        ServiceRecord(name="w1", role="agg", depends_on=["etcd"]),
        ServiceRecord(name="fe", role="frontend", depends_on=["w0", "w1"]),
    ]
    assert [[r.name for r in wave] for wave in stop_waves(new)] == [["fe"], ["w1", "w0"], ["etcd"]]


def test_a_service_never_healthy_times_out_and_leaves_nothing(env):
    plan = infra_plan(env, startup_timeout_secs=1.0)
    hung = Service(
        name="hung",
        role="test",
        argv=(
            sys.executable,
            "-c",
            "import time; print('still loading', flush=True); time.sleep(600)",
        ),
        cwd=plan.deployment_dir,
        probes=(TcpProbe(host="127.0.0.1", port=free_port()),),
        log_file=f"{plan.deployment_dir}/logs/hung.log",
    )
    plan = plan.replace(services=(hung,))
    sup = Supervisor(plan)
    with pytest.raises(StartFailed, match="not healthy within 1 s") as exc:
        sup.start(detach=True)
    assert exc.value.log_tail == ["still loading"]
    assert_nothing_left(
        [(h.record.pid, h.record.create_time) for h in sup.handles], plan.deployment_dir
    )


def test_down_sweeps_descendants_that_left_the_process_group(env):
    plan = infra_plan(env)
    plan = plan.replace(services=(listener("escaper", plan, orphan=True, deps=()),))
    state = Supervisor(plan).start(detach=True)
    time.sleep(0.3)
    leader = psutil.Process(state.services[0].pid)
    escaped = [p for p in leader.children() if os.getpgid(p.pid) != leader.pid]
    assert escaped, "the test service should have spawned a process in its own session"
    report = stop_deployment(plan.deployment_dir, grace=3)
    assert report.found
    assert_nothing_left(
        [(p.pid, p.create_time()) for p in escaped] + pids_of(state), plan.deployment_dir
    )


def test_foreground_watch_reports_a_service_that_dies(env):
    plan = infra_plan(env)
    plan = plan.replace(services=plan.services[:1] + (listener("short", plan, lifetime=1.5),))
    sup = Supervisor(plan, poll_interval=0.1)
    sup.start(detach=False)
    assert read_state(plan.deployment_dir).mode == "foreground"
    lines = []
    result = sup.watch(lambda name, line: lines.append((name, line)))
    assert (result.reason, result.service, result.exit_code) == ("died", "short", 4)
    assert ("short", "exiting") in lines
    assert result.log_tail[-1] == "exiting"
    sup.stop()
    assert_nothing_left(
        [(h.record.pid, h.record.create_time) for h in sup.handles], plan.deployment_dir
    )


def test_foreground_watch_ends_when_down_runs_elsewhere(env):
    plan = infra_plan(env)
    sup = Supervisor(plan)
    sup.start(detach=False)
    timer = threading.Timer(0.5, lambda: stop_deployment(plan.deployment_dir, grace=5))
    timer.start()
    result = sup.watch(lambda *_: None)
    timer.join()
    assert result.reason == "removed"
    sup.stop()  # nothing left of ours to stop: a no-op
    assert_nothing_left(
        [(h.record.pid, h.record.create_time) for h in sup.handles], plan.deployment_dir
    )


def test_preflight_names_the_owner_of_a_taken_port(env):
    plan = infra_plan(env)
    taken = plan.service("nats").ports["monitor"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        result = plan_check("ports.nats", plan)
        assert result.status is Status.FAIL
        assert f"nats monitor port {taken} is taken by pid {os.getpid()}" in result.detail
        assert f"kill {os.getpid()}" in result.fix and "DYNKV_NATS_MONITOR_PORT=" in result.fix
        assert plan_check("ports.nats", plan, owned_pids={os.getpid()}).status is Status.OK


def test_preflight_checks_external_endpoints(env, tmp_path):
    infra = infra_plan(env)
    Supervisor(infra).start(detach=True)
    try:
        ext_env = port_env(tmp_path / "ext", name="ext")
        ext_env.update(
            DYNKV_INFRA="external",
            DYNKV_ETCD_ENDPOINTS=infra.etcd_endpoints[0],
            DYNKV_NATS_URL=infra.nats_url,
        )
        results = preflight_infra(ext_env)
        assert [r.status for r in results] == [Status.OK, Status.OK]
        monitor = infra.service("nats").ports["monitor"]
        ext_env.update(
            DYNKV_ETCD_ENDPOINTS=f"http://127.0.0.1:{free_port()}",
            DYNKV_NATS_URL=f"nats://127.0.0.1:{monitor}",  # HTTP, not NATS: no INFO greeting
        )
        results = preflight_infra(ext_env)
        assert [(r.status, r.detail.split(":")[0]) for r in results] == [
            (Status.FAIL, "external etcd unhealthy"),
            (Status.FAIL, "external NATS unreachable"),
        ]
        assert "DYNKV_ETCD_ENDPOINTS" in results[0].fix and "DYNKV_NATS_URL" in results[1].fix
    finally:
        stop_deployment(infra.deployment_dir, grace=5)


def preflight_infra(env) -> list:
    """`up`'s preflight of the external etcd and NATS of the deployment `env` describes."""
    plan, resolved = full_plan(env), resolve(env=env)
    return [plan_check(c, plan, resolved=resolved) for c in ("infra.etcd", "infra.nats")]
