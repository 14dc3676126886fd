"""Run a Plan: claim the deployment, start services in order, wait for each to be healthy,
follow them in the foreground, and stop everything this run started.

The rules this module keeps:
- One live run per deployment dir. The claim (read state, decide, write the new state) happens
  under the state lock; a stale state (every recorded process dead or replaced) is cleaned first.
- The state file is written after every start, so a `dynkv up` killed halfway still leaves enough
  for `dynkv down` to clean up.
- A failed start (a service exits, or is not healthy within the start-up timeout, or Ctrl-C)
  stops everything started so far and removes the state: nothing is left running.
How a deployment is stopped is `supervisor.teardown`'s; what a service is, `supervisor.units`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from dynkv.infra.docker import DockerBackend
from dynkv.plan.model import Plan, Service, redact_urls, start_waves
from dynkv.supervisor import health
from dynkv.supervisor.logs import LogSource, follow, last_line
from dynkv.supervisor.process import marked_processes, marker_prefix
from dynkv.supervisor.restart_policy import RestartPolicy
from dynkv.supervisor.restarts import Restarter, exit_record
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore
from dynkv.supervisor.status import AlreadyRunning, live_detail
from dynkv.supervisor.teardown import DEFAULT_GRACE, Observer, stop_state
from dynkv.supervisor.units import Unit, start_unit
from dynkv.tls.layout import materialize

LOG_TAIL = 20


class StartFailed(Exception):
    """A service did not come up; `log_tail` holds the last lines of its log."""

    def __init__(self, service: str, reason: str, log_tail: list[str], log: str = "") -> None:
        super().__init__(f"{service} {reason}")
        self.service, self.reason, self.log_tail, self.log = service, reason, log_tail, log


@dataclass
class _Handle:
    service: Service
    unit: Unit

    @property
    def record(self) -> ServiceRecord:
        return self.unit.record


@dataclass
class WatchResult:
    # "died" | "removed" (state gone: `dynkv down` elsewhere) | "output_closed" | "left" (a
    # joined node told to leave by the first host's `dynkv down`: docs/multi-host.md)
    reason: str
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
        restart: RestartPolicy | None = None,
        leave: Callable[[], bool] | None = None,
    ) -> None:
        """`leave`: asked every few seconds while the deployment runs; True ends the run as
        "left" (a joined node whose first host went down: `dynkv.join.leave`)."""
        self.plan = plan
        self.leave = leave
        self.store = StateStore(plan.deployment_dir)
        self.observer = observer or Observer()
        self.docker = docker or DockerBackend()  # contacted only for a container service
        self.poll_interval = poll_interval
        self.probe_timeout = probe_timeout
        self.grace = grace
        self.instance = marker_prefix(plan.deployment_dir) + uuid.uuid4().hex[:12]
        self.handles: list[_Handle] = []
        self.state: DeploymentState | None = None
        # restart on failure (docs/restart.md); None: a service that exits ends a foreground run
        self.restarter = Restarter(self, restart or RestartPolicy.never())

    # ---- start ---------------------------------------------------------------------------

    def start(self, *, detach: bool, background: bool = False) -> DeploymentState:
        """Start every service and wait until all are healthy; on any failure (or Ctrl-C) stop
        what was started, clear the state and re-raise. `background`: this process stays to
        supervise a detached deployment (`supervisor.background`), so it stays recorded."""
        self._claim(detach)
        try:
            if self.plan.transport_security is not None:
                # `up --advertise`: the CA (made once) and this run's certificates, before any
                # service that reads them starts (docs/multi-host.md)
                materialize(self.plan.transport_security, self.plan.name)
            for wave in start_waves(self.plan.services):
                self._wait_healthy([self._start_one(service) for service in wave])
        except BaseException:
            self.stop()
            raise
        assert self.state is not None
        with self.store.lock():
            self.state.phase = "running"
            if detach and not background:
                self.state.supervisor_pid = self.state.supervisor_create_time = None
            self.store.write(self.state)
        return self.state

    def _claim(self, detach: bool) -> None:
        with self.store.lock():
            existing = self.store.read_or_none()
            if existing is not None:
                live = live_detail(existing, self.docker)
                if live:
                    raise AlreadyRunning(self.plan.name, live)
                stop_state(existing, self.store, grace=2.0, docker=self.docker)
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
                etcd_endpoints=[redact_urls(e) for e in self.plan.etcd_endpoints],
            )
            self.store.write(self.state)

    def _start_one(self, service: Service) -> _Handle:
        assert self.state is not None
        self.observer.starting(service)
        log_path = Path(service.log_file) if service.log_file else self.store.log_path(service.name)
        unit = start_unit(service, instance=self.instance, log_path=log_path, docker=self.docker)
        started = _Handle(service, unit)
        self.handles.append(started)
        with self.store.lock():
            self.state.services.append(unit.record)
            self.store.write(self.state)
        return started

    def _wait_healthy(self, wave: list[_Handle]) -> None:
        """Poll services started together until every one is healthy; the first that exits or
        outlives DYNKV_STARTUP_TIMEOUT_SECS fails the start (the caller stops them all)."""
        began = time.monotonic()
        pending = list(wave)
        while pending:
            for item in list(pending):
                if self._is_healthy(item, time.monotonic() - began):
                    pending.remove(item)
            if pending:
                time.sleep(self.poll_interval)

    def _start_failed(self, item: _Handle, short: str, cause: str) -> StartFailed:
        """Tell the observer (`short`) and build the error with the service's last log lines."""
        self.observer.failed(item.service, short)
        return StartFailed(item.service.name, cause, item.unit.tail(LOG_TAIL), item.unit.log_path)

    def _is_healthy(self, item: _Handle, elapsed: float) -> bool:
        service, unit = item.service, item.unit
        timeout = self.plan.startup_timeout_secs
        code = unit.exit_code()
        if code is not None:
            raise self._start_failed(
                item, f"exited with code {code}", f"exited with code {code} during start-up"
            )
        ok, detail = health.check_all(service.probes, self.probe_timeout)
        if ok:
            self.observer.healthy(service, elapsed)
            return True
        if elapsed > timeout:
            raise self._start_failed(
                item,
                f"not healthy after {timeout:g} s",
                f"was not healthy within {timeout:g} s (DYNKV_STARTUP_TIMEOUT_SECS): {detail}",
            )
        now = last_line(unit.log_path) if unit.log_path else ""
        self.observer.waiting(service, elapsed, now, detail)
        return False

    # ---- foreground ----------------------------------------------------------------------

    def log_sources(self, *, from_end: bool = True) -> dict[str, LogSource]:
        return {s.service.name: s.unit.follow(from_end=from_end) for s in self.handles}

    def watch(
        self,
        on_line: Callable[[str, str], None],
        *,
        output_closed: Callable[[], bool] = lambda: False,
    ) -> WatchResult:
        """Stream log lines to `on_line(service, line)` until a service dies, the state is
        removed by `dynkv down` elsewhere, or `output_closed()` says nobody reads the lines any
        more. Ctrl-C / SIGTERM / SIGHUP arrive as exceptions."""
        check_every, next_check = 1.0, time.monotonic() + 1.0
        result: WatchResult | None = None

        def should_stop() -> bool:
            nonlocal next_check, result
            if time.monotonic() < next_check:
                return False
            next_check = time.monotonic() + check_every
            result = WatchResult("output_closed") if output_closed() else self._check_running()
            if result is None and self.leave is not None and self.leave():
                result = WatchResult("left")
            return result is not None

        for name, line in follow(self.log_sources(), should_stop=should_stop):
            on_line(name, line)
        assert result is not None
        return result

    def _check_running(self) -> WatchResult | None:
        # Under the lock: a `dynkv down` elsewhere holds it while it stops the services, so this
        # sees "state removed" after it, never "service died" halfway through it.
        state = self.store.snapshot()
        if state is None or state.instance != self.instance:
            return WatchResult("removed")
        for item in self.restarter.step():  # only with restarts disabled
            code = item.unit.exit_code()
            return WatchResult("died", item.service.name, code, item.unit.tail(LOG_TAIL))
        return None

    def keep(self, *, check_every: float = 1.0) -> WatchResult:
        """Supervise without following the logs (the background supervisor of `up -d`): restart
        what fails until the state is removed (`dynkv down`) or a signal arrives as an exception.
        With restarts disabled a service that exits stays down and the rest keeps serving."""
        while True:
            state = self.store.snapshot()
            if state is None or state.instance != self.instance:
                return WatchResult("removed")
            for item in self.restarter.step():  # restarts disabled: recorded as given up
                self.restarter.exited(item, exit_record(item, item.unit.exit_code() or 0))
            if self.leave is not None and self.leave():
                return WatchResult("left")
            time.sleep(check_every)

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop this run's services (reverse order) and clear the state if it is still ours.
        Safe to call more than once."""
        with self.store.lock():
            state = self.store.read_or_none()
            own_file = state is not None and state.instance == self.instance
            if not own_file:
                state = self.state  # nothing written yet, or someone else's: stop only ours
            if state is not None:
                stop_state(
                    state,
                    self.store,
                    grace=self.grace,
                    docker=self.docker,
                    observer=self.observer,
                    clear=own_file,
                )
        for item in self.handles:  # reap our children so no zombie lingers in this process
            item.unit.reap()
