"""Run a Plan: claim the deployment, start services in order, wait for each to be healthy,
follow them in the foreground, and stop everything (here or from `dynkv down` in another process).

The rules this module keeps:
- One live run per deployment dir. The claim (read state, decide, write the new state) happens
  under the state lock; a stale state (every recorded process dead or replaced) is cleaned first.
- The state file is written after every start, so a `dynkv up` killed halfway still leaves enough
  for `dynkv down` to clean up.
- A failed start (a service exits, or is not healthy within the start-up timeout, or Ctrl-C)
  stops everything started so far and removes the state: nothing is left running.
- Stopping goes in reverse start order, then sweeps every process carrying the run's
  `DYNKV_INSTANCE` marker (descendants that escaped their process group) and removes the
  services' data dirs (etcd data, NATS store). Logs are kept for a post-mortem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dynkv.infra.docker import DockerBackend, DockerUnavailable
from dynkv.plan.model import Plan, Service, start_waves
from dynkv.supervisor import health
from dynkv.supervisor.logs import FileFollower, IteratorFollower, LogSource, follow, last_line
from dynkv.supervisor.logs import tail_lines as _tail_lines
from dynkv.supervisor.metrics import read_kvbm
from dynkv.supervisor.process import (
    group_of,
    is_alive,
    marked_processes,
    prepare,
    same_process,
    spawn,
    stop_service,
    terminate,
    with_descendants,
)
from dynkv.supervisor.state import CorruptState, DeploymentState, ServiceRecord, StateStore

DEFAULT_GRACE = 10.0
LOG_TAIL = 20
WORKER_ROLES = ("agg", "prefill", "decode")


class AlreadyRunning(Exception):
    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"deployment {name!r} is already running ({detail})")
        self.name = name


class StartFailed(Exception):
    """A service did not come up; `log_tail` holds the last lines of its log."""

    def __init__(self, service: str, reason: str, log_tail: list[str], log: str = "") -> None:
        super().__init__(f"{service} {reason}")
        self.service, self.reason, self.log_tail, self.log = service, reason, log_tail, log


class Observer:
    """What `up` shows while it works; the CLI renders it with rich, tests ignore it."""

    def starting(self, service: Service) -> None: ...

    def waiting(self, service: Service, elapsed: float, last_line: str, detail: str) -> None: ...

    def healthy(self, service: Service, elapsed: float) -> None: ...

    def failed(self, service: Service, reason: str) -> None: ...

    def stopping(self, name: str) -> None: ...


def marker_prefix(deployment_dir: Path | str) -> str:
    """The DYNKV_INSTANCE prefix shared by every run of one deployment dir."""
    return f"{Path(deployment_dir).resolve()}#"


def processes_left(services: Iterable[ServiceRecord], deployment_dir: Path | str) -> list[str]:
    """What of a deployment still runs, one line each; empty after a clean `down`.

    Three nets, because each misses something: a service's pid with its create-time (PID
    reuse), the members of its process group (vLLM's engine processes rename themselves with
    setproctitle), and any process carrying the deployment's DYNKV_INSTANCE marker (a child
    that left the group)."""
    problems = []
    for svc in services:
        if svc.pid and same_process(svc.pid, svc.create_time):
            problems.append(f"{svc.name} (pid {svc.pid}) still runs")
        if svc.pgid:
            problems += [f"pid {p.pid} left in {svc.name}'s group" for p in group_of(svc.pgid)]
    problems += [
        f"pid {p.pid} still carries the deployment's marker"
        for p in marked_processes(marker_prefix(deployment_dir))
    ]
    return problems


@dataclass
class _Handle:
    service: Service
    record: ServiceRecord
    popen: subprocess.Popen | None = None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


@dataclass
class WatchResult:
    reason: str  # "died" | "removed" (state gone: `dynkv down` elsewhere)
    service: str | None = None
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)


class Supervisor:
    """One run of a plan, from this process."""

    def __init__(
        self,
        plan: Plan,
        *,
        observer: Observer | None = None,
        docker: DockerBackend | None = None,
        poll_interval: float = 0.25,
        probe_timeout: float = 1.0,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.plan = plan
        self.store = StateStore(plan.deployment_dir)
        self.observer = observer or Observer()
        self._docker = docker
        self.poll_interval = poll_interval
        self.probe_timeout = probe_timeout
        self.grace = grace
        self.instance = marker_prefix(plan.deployment_dir) + uuid.uuid4().hex[:12]
        self.handles: list[_Handle] = []
        self.state: DeploymentState | None = None

    @property
    def docker(self) -> DockerBackend:
        if self._docker is None:
            self._docker = DockerBackend()
        return self._docker

    # ---- start ---------------------------------------------------------------------------

    def start(self, *, detach: bool) -> DeploymentState:
        """Start every service and wait until all are healthy; on any failure (or Ctrl-C) stop
        what was started, clear the state and re-raise."""
        self._claim(detach)
        try:
            for wave in start_waves(self.plan.services):
                self._wait_healthy([self._spawn_one(service) for service in wave])
        except BaseException:
            self.stop()
            raise
        assert self.state is not None
        with self.store.lock():
            self.state.phase = "running"
            if detach:
                self.state.supervisor_pid = self.state.supervisor_create_time = None
            self.store.write(self.state)
        return self.state

    def _claim(self, detach: bool) -> None:
        with self.store.lock():
            try:
                existing = self.store.read()
            except CorruptState:
                existing = None
            if existing is not None:
                live = live_detail(existing, self._docker_if(existing))
                if live:
                    raise AlreadyRunning(self.plan.name, live)
                _stop_state(existing, self.store, grace=2.0, docker=self._docker_if(existing))
            orphans = marked_processes(marker_prefix(self.plan.deployment_dir))
            if orphans:
                pids = ", ".join(str(p.pid) for p in orphans[:5])
                raise AlreadyRunning(self.plan.name, f"processes {pids} run without a state file")
            me = psutil.Process()
            self.state = DeploymentState(
                name=self.plan.name,
                instance=self.instance,
                infra=self.plan.infra,
                phase="starting",
                mode="detached" if detach else "foreground",
                created_at=time.time(),
                supervisor_pid=me.pid,
                supervisor_create_time=me.create_time(),
                etcd_endpoints=list(self.plan.etcd_endpoints),
            )
            self.store.write(self.state)

    def _docker_if(self, state: DeploymentState) -> DockerBackend | None:
        if any(s.kind == "container" for s in state.services):
            return self._docker or DockerBackend()
        return None

    def _spawn_one(self, service: Service) -> _Handle:
        assert self.state is not None
        self.observer.starting(service)
        log_path = Path(service.log_file) if service.log_file else self.store.log_path(service.name)
        if service.kind == "container":
            assert service.container is not None
            prepare(service)
            container_id = self.docker.start(service.container)
            record = ServiceRecord(
                name=service.name,
                role=service.role,
                kind="container",
                container_id=container_id,
                started_at=time.time(),
                ports=dict(service.ports),
                argv=list(service.container.command),
                probes=[p.to_json() for p in service.probes],
                data_dirs=list(service.data_dirs),
                meta=dict(service.meta),
            )
            handle = _Handle(service, record)
        else:
            popen, record = spawn(service, instance=self.instance, log_path=log_path)
            handle = _Handle(service, record, popen)
        self.handles.append(handle)
        with self.store.lock():
            self.state.services.append(record)
            self.store.write(self.state)
        return handle

    def _wait_healthy(self, handles: list[_Handle]) -> None:
        """Poll services started together until every one is healthy; the first that exits or
        outlives DYNKV_STARTUP_TIMEOUT_SECS fails the start (the caller stops them all)."""
        started = time.monotonic()
        timeout = self.plan.startup_timeout_secs
        pending = list(handles)
        while pending:
            for handle in list(pending):
                if self._is_healthy(handle, time.monotonic() - started, timeout):
                    pending.remove(handle)
            if pending:
                time.sleep(self.poll_interval)

    def _is_healthy(self, handle: _Handle, elapsed: float, timeout: float) -> bool:
        service, record = handle.service, handle.record
        code = self._exit_code(handle)
        if code is not None:
            self.observer.failed(service, f"exited with code {code}")
            raise StartFailed(
                service.name, f"exited with code {code} during start-up", *self._tail(record)
            )
        ok, detail = health.check_all(service.probes, self.probe_timeout)
        if ok:
            self.observer.healthy(service, elapsed)
            return True
        if elapsed > timeout:
            self.observer.failed(service, f"not healthy after {timeout:g} s")
            raise StartFailed(
                service.name,
                f"was not healthy within {timeout:g} s (DYNKV_STARTUP_TIMEOUT_SECS): {detail}",
                *self._tail(record),
            )
        self.observer.waiting(service, elapsed, last_line(record.log) if record.log else "", detail)
        return False

    def _exit_code(self, handle: _Handle) -> int | None:
        if handle.popen is not None:
            return handle.popen.poll()
        cid = handle.record.container_id
        if cid and not self.docker.is_running(cid):
            container = self.docker.get(cid)
            return int(container.attrs["State"]["ExitCode"]) if container is not None else -1
        return None

    def _tail(self, record: ServiceRecord) -> tuple[list[str], str]:
        if record.kind == "container" and record.container_id:
            return list(self.docker.logs(record.container_id, tail=LOG_TAIL, follow=False)), ""
        return _tail_lines(record.log, LOG_TAIL), record.log

    # ---- foreground ----------------------------------------------------------------------

    def log_sources(self, *, from_end: bool = True) -> dict[str, LogSource]:
        sources: dict[str, LogSource] = {}
        for h in self.handles:
            if h.record.kind == "container" and h.record.container_id:
                sources[h.record.name] = IteratorFollower(
                    self.docker.logs(h.record.container_id, tail=0, follow=True)
                )
            else:
                sources[h.record.name] = FileFollower(h.record.log, from_end=from_end)
        return sources

    def watch(self, on_line: Callable[[str, str], None]) -> WatchResult:
        """Stream log lines to `on_line(service, line)` until a service dies or the state is
        removed by `dynkv down` elsewhere. Ctrl-C / SIGTERM arrive as exceptions."""
        check_every, next_check = 1.0, time.monotonic() + 1.0
        result: WatchResult | None = None

        def should_stop() -> bool:
            nonlocal next_check, result
            if time.monotonic() < next_check:
                return False
            next_check = time.monotonic() + check_every
            result = self._check_running()
            return result is not None

        for name, line in follow(self.log_sources(), should_stop=should_stop):
            on_line(name, line)
        assert result is not None
        return result

    def _check_running(self) -> WatchResult | None:
        # Under the lock: a `dynkv down` elsewhere holds it while it stops the services, so this
        # sees "state removed" after it, never "service died" halfway through it.
        with self.store.lock():
            try:
                state = self.store.read()
            except CorruptState:
                state = None
        if state is None or state.instance != self.instance:
            return WatchResult("removed")
        for h in self.handles:
            code = self._exit_code(h)
            if code is not None:
                tail, _ = self._tail(h.record)
                return WatchResult("died", h.record.name, code, tail)
        return None

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop this run's services (reverse order) and clear the state if it is still ours."""
        with self.store.lock():
            try:
                state = self.store.read()
            except CorruptState:
                state = None
            if state is None or state.instance != self.instance:
                state = self.state  # nothing written yet, or someone else's: stop only ours
                own_file = False
            else:
                own_file = True
            if state is not None:
                _stop_state(
                    state,
                    self.store,
                    grace=self.grace,
                    docker=self._docker_if(state),
                    observer=self.observer,
                    clear=own_file,
                )
        for h in self.handles:  # reap our children so no zombie lingers in this process
            if h.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.popen.wait(timeout=1)


# ---- stopping from any process -------------------------------------------------------------


@dataclass
class StopReport:
    found: bool
    stopped: list[str] = field(default_factory=list)
    killed: int = 0  # processes that needed SIGKILL
    stragglers: int = 0  # processes found only by their DYNKV_INSTANCE marker
    containers: int = 0
    warnings: list[str] = field(default_factory=list)


def _stop_state(
    state: DeploymentState,
    store: StateStore,
    *,
    grace: float,
    docker: DockerBackend | None,
    observer: Observer | None = None,
    clear: bool = True,
) -> StopReport:
    """Stop every service of `state` (call under the state lock)."""
    report = StopReport(found=True)
    for record in reversed(state.services):
        if observer:
            observer.stopping(record.name)
        if record.kind == "container":
            if record.container_id and docker is not None:
                try:
                    docker.stop(record.container_id, grace)
                    report.containers += 1
                except DockerUnavailable as exc:
                    report.warnings.append(f"{record.name}: {exc.cause}")
        else:
            report.killed += stop_service(record, instance=state.instance, grace=grace)
        report.stopped.append(record.name)
    stragglers = with_descendants(marked_processes(state.instance))
    if stragglers:
        report.stragglers = len(stragglers)
        report.killed += terminate(stragglers, grace=min(grace, 3.0))
    for record in state.services:
        for d in record.data_dirs:
            _remove_inside(Path(d), store.dir)
    if clear:
        store.clear()
    return report


def _remove_inside(path: Path, root: Path) -> None:
    """rmtree, but only below the deployment dir, or a disagg handoff pool in /dev/shm named
    dynkv-<name> (a state file is not trusted to name anything else)."""
    resolved = path.resolve()
    shm_pool = resolved.parent == Path("/dev/shm") and resolved.name.startswith("dynkv-")
    if not shm_pool:
        try:
            resolved.relative_to(root.resolve())
        except ValueError:
            return
    shutil.rmtree(path, ignore_errors=True)


def stop_deployment(
    deployment_dir: Path | str,
    *,
    grace: float = DEFAULT_GRACE,
    docker: DockerBackend | None = None,
    observer: Observer | None = None,
) -> StopReport:
    """`dynkv down`: stop everything of the deployment, whoever started it; idempotent."""
    store = StateStore(deployment_dir)
    name = store.name
    if not store.dir.is_dir():
        return StopReport(found=False)
    with store.lock():
        try:
            state = store.read()
        except CorruptState:
            state = None
    if state is not None:
        _stop_supervisor(state, grace)
    with store.lock():
        try:
            state = store.read()
        except CorruptState as exc:
            state = None
            store.clear()
            warning = f"removed an unreadable state file ({exc})"
        else:
            warning = None
        report = StopReport(found=False)
        if state is not None:
            uses_docker = any(s.kind == "container" for s in state.services)
            report = _stop_state(
                state,
                store,
                grace=grace,
                docker=(docker or DockerBackend()) if uses_docker else None,
                observer=observer,
            )
        if warning:
            report.warnings.append(warning)
        orphans = with_descendants(marked_processes(marker_prefix(deployment_dir)))
        if orphans:
            report.found = True
            report.stragglers += len(orphans)
            report.killed += terminate(orphans, grace=min(grace, 3.0))
        report.containers += _remove_labelled_containers(name, docker, grace, report, state)
    return report


def ensure_not_running(deployment_dir: Path | str, name: str) -> None:
    """AlreadyRunning when a live run owns the deployment dir. `up` asks before its preflight
    (whose port checks would otherwise blame the running deployment's own ports); the claim in
    `Supervisor.start` asks again under the lock."""
    store = StateStore(deployment_dir)
    if not store.exists():
        return
    with store.lock():
        try:
            state = store.read()
        except CorruptState:
            return
    if state is not None:
        uses_docker = any(s.kind == "container" for s in state.services)
        live = live_detail(state, DockerBackend() if uses_docker else None)
        if live:
            raise AlreadyRunning(name, live)


def _stop_supervisor(state: DeploymentState, grace: float) -> None:
    """A foreground or still-starting `up` tears down its own services when told to: ask it
    (SIGTERM) and give it the time to, rather than race it."""
    if state.supervisor_pid is None or state.supervisor_pid == os.getpid():
        return
    proc = same_process(state.supervisor_pid, state.supervisor_create_time)
    if proc is None:
        return
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace * 2 + 5)


def _remove_labelled_containers(
    name: str,
    docker: DockerBackend | None,
    grace: float,
    report: StopReport,
    state: DeploymentState | None,
) -> int:
    """Containers labelled with the deployment, as compose finds its project's containers. Only
    asked of an engine when one is reachable (docker infra or no state to tell)."""
    if state is not None and not (
        state.infra == "docker" or any(s.kind == "container" for s in state.services)
    ):
        return 0
    backend = docker or DockerBackend()
    try:
        found = backend.find(name)
    except DockerUnavailable as exc:
        if state is not None:  # a docker deployment whose engine went away
            report.warnings.append(exc.cause)
        return 0
    for container in found:
        backend.remove(container, grace)
        report.found = True
    return len(found)


# ---- liveness and status ---------------------------------------------------------------------


def _record_running(record: ServiceRecord, docker: DockerBackend | None) -> bool:
    if record.kind == "container":
        if docker is None or not record.container_id:
            return False
        try:
            return docker.is_running(record.container_id)
        except DockerUnavailable:
            return False
    return is_alive(record)


def live_detail(state: DeploymentState, docker: DockerBackend | None = None) -> str | None:
    """Why this state belongs to a live run, or None when it is stale (crashed run)."""
    running = [s.name for s in state.services if _record_running(s, docker)]
    if running:
        return "running: " + ", ".join(running)
    if state.phase == "starting" and same_process(
        state.supervisor_pid, state.supervisor_create_time
    ):
        return f"`dynkv up` (pid {state.supervisor_pid}) is starting it"
    return None


@dataclass
class ServiceStatus:
    name: str
    role: str
    kind: str
    pid: int | None
    running: bool
    healthy: bool
    uptime_s: float | None
    ports: dict[str, int]
    log: str
    detail: str
    url: str | None = None
    kvbm: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "pid": self.pid,
            "running": self.running,
            "healthy": self.healthy,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "ports": self.ports,
            "url": self.url,
            "log": self.log,
            "detail": self.detail,
            "kvbm": self.kvbm,
        }


@dataclass
class StatusReport:
    name: str
    deployment_dir: str
    phase: str
    mode: str
    infra: str
    services: list[ServiceStatus]

    @property
    def healthy(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "deployment_dir": self.deployment_dir,
            "phase": self.phase,
            "mode": self.mode,
            "infra": self.infra,
            "healthy": self.healthy,
            "services": [s.to_json() for s in self.services],
        }


def read_state(deployment_dir: Path | str) -> DeploymentState | None:
    store = StateStore(deployment_dir)
    if not store.dir.is_dir():
        return None
    with store.lock():
        return store.read()


def deployment_status(
    deployment_dir: Path | str,
    *,
    docker: DockerBackend | None = None,
    probe_timeout: float = 1.0,
) -> StatusReport | None:
    """Each recorded service: running (pid + create_time), healthy (its probes), uptime; for
    workers, the KVBM numbers from their metrics endpoint. None when there is no deployment."""
    state = read_state(deployment_dir)
    if state is None:
        return None
    uses_docker = any(s.kind == "container" for s in state.services)
    backend = (docker or DockerBackend()) if uses_docker else None
    now = time.time()
    services = []
    for rec in state.services:
        running = _record_running(rec, backend)
        if running:
            healthy, detail = health.check_all(
                [health.probe_from_json(p) for p in rec.probes], probe_timeout
            )
        else:
            healthy, detail = False, "not running"
        kvbm = None
        if rec.role in WORKER_ROLES and rec.meta.get("metrics_url"):  # "": a worker without KVBM
            kvbm = read_kvbm(rec.meta["metrics_url"], probe_timeout) if running else None
        services.append(
            ServiceStatus(
                name=rec.name,
                role=rec.role,
                kind=rec.kind,
                pid=rec.pid,
                running=running,
                healthy=healthy,
                uptime_s=(now - (rec.create_time or rec.started_at or now)) if running else None,
                ports=dict(rec.ports),
                log=rec.log,
                detail=detail,
                url=rec.meta.get("url"),
                kvbm=kvbm,
            )
        )
    return StatusReport(
        name=state.name,
        deployment_dir=str(Path(deployment_dir)),
        phase=state.phase,
        mode=state.mode,
        infra=state.infra,
        services=services,
    )


def log_sources(
    deployment_dir: Path | str,
    services: list[str] | None,
    *,
    tail: int | None,
    follow_: bool,
    docker: DockerBackend | None = None,
) -> tuple[dict[str, list[str]], dict[str, LogSource]]:
    """For `dynkv logs`: per service, the last `tail` lines, and (with follow_) a source of new
    lines. Works from the state file, or from logs/ when the deployment is down."""
    store = StateStore(deployment_dir)
    state = read_state(deployment_dir)
    records: dict[str, ServiceRecord] = {}
    if state is not None:
        records = {s.name: s for s in state.services}
    elif store.logs_dir.is_dir():
        for path in sorted(store.logs_dir.glob("*.log")):
            records[path.stem] = ServiceRecord(name=path.stem, role="", log=str(path))
    wanted = services or list(records)
    unknown = [s for s in wanted if s not in records]
    if unknown:
        raise KeyError(", ".join(unknown))
    backend = docker
    heads: dict[str, list[str]] = {}
    sources: dict[str, LogSource] = {}
    for name in wanted:
        rec = records[name]
        if rec.kind == "container" and rec.container_id:
            backend = backend or DockerBackend()
            heads[name] = list(backend.logs(rec.container_id, tail=tail, follow=False))
            if follow_:
                sources[name] = IteratorFollower(
                    backend.logs(rec.container_id, tail=0, follow=True)
                )
        else:
            follower = FileFollower(rec.log, from_end=True)  # first: no line falls in between
            heads[name] = _tail_lines(rec.log, tail, end=follower.pos)
            if follow_:
                sources[name] = follower
    return heads, sources
