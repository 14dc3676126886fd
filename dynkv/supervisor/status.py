"""What a deployment is doing, asked from any process: `status`, `logs`, and whether a live run
owns a deployment dir (`up` asks before it claims one).

Everything here works from the state file alone, through the same service units the run uses
(`supervisor.units`), so it answers the same for a foreground `up` in another terminal, a
detached deployment, or one whose `up` is long gone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynkv.infra.docker import DockerBackend
from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.supervisor import health
from dynkv.supervisor.logs import LogSource
from dynkv.supervisor.metrics import read_kvbm
from dynkv.supervisor.process import same_process
from dynkv.supervisor.router_status import read_router
from dynkv.supervisor.state import DeploymentState, ServiceRecord, StateStore
from dynkv.supervisor.units import unit_for

# How long a probe of `status` may take before the service counts as unhealthy. The probes run
# concurrently, so this bounds the whole command; a worker's /health is answered by vLLM's API
# process, which a busy 2-core host can keep waiting well past a second.
STATUS_PROBE_TIMEOUT = 3.0
PROBE_THREADS = 16


class AlreadyRunning(Exception):
    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"deployment {name!r} is already running ({detail})")
        self.name = name


def live_detail(state: DeploymentState, docker: DockerBackend | None = None) -> str | None:
    """Why this state belongs to a live run, or None when it is stale (crashed run)."""
    docker = docker or DockerBackend()  # contacted only for a container service
    running = [s.name for s in state.services if unit_for(s, docker).running()]
    if running:
        return "running: " + ", ".join(running)
    if state.phase == "starting" and same_process(
        state.supervisor_pid, state.supervisor_create_time
    ):
        return f"`dynkv up` (pid {state.supervisor_pid}) is starting it"
    return None


def ensure_not_running(deployment_dir: Path | str, name: str) -> None:
    """AlreadyRunning when a live run owns the deployment dir. `up` asks before its preflight
    (whose port checks would otherwise blame the running deployment's own ports); the claim in
    `Supervisor.start` asks again under the lock."""
    state = StateStore(deployment_dir).snapshot()
    if state is not None:
        live = live_detail(state)
        if live:
            raise AlreadyRunning(name, live)


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
    restarts: int = 0
    last_exit: dict[str, Any] | None = None  # state.ExitRecord as JSON, plus "describe"
    restart_phase: str = ""  # "" | "backoff" | "starting" | "given_up" (docs/restart.md)
    recovered_after_s: float | None = None

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
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "restart_phase": self.restart_phase,
            "recovered_after_s": self.recovered_after_s,
        }


@dataclass
class StatusReport:
    name: str
    deployment_dir: str
    phase: str
    mode: str
    infra: str
    services: list[ServiceStatus]
    supervisor_pid: int | None = None  # the live process that restarts failed services, if any
    router: dict[str, Any] | None = None  # the frontend's router (supervisor.router_status)

    @property
    def healthy(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services)

    def to_json(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "deployment_dir": self.deployment_dir,
            "phase": self.phase,
            "mode": self.mode,
            "infra": self.infra,
            "healthy": self.healthy,
            "supervisor_pid": self.supervisor_pid,
            "services": [s.to_json() for s in self.services],
        }
        if self.router is not None:  # only a frontend with a router has the key
            data["router"] = self.router
        return data


def read_state(deployment_dir: Path | str) -> DeploymentState | None:
    """The state under the lock; CorruptState when the file is unreadable (the caller says so)."""
    store = StateStore(deployment_dir)
    if not store.dir.is_dir():
        return None
    with store.lock():
        return store.read()


def _health(rec: ServiceRecord, timeout: float) -> tuple[bool, str]:
    probes = [health.probe_from_json(p) for p in rec.probes]
    if any(p is None for p in probes):
        return False, "a readiness check this dynkv does not know (written by a newer dynkv?)"
    return health.check_all([p for p in probes if p is not None], timeout)


def service_status(
    rec: ServiceRecord, docker: DockerBackend, *, probe_timeout: float, now: float
) -> ServiceStatus:
    """One service: running (the one recorded), healthy (its probes), uptime, KVBM numbers."""
    running = unit_for(rec, docker).running()
    healthy, detail = _health(rec, probe_timeout) if running else (False, "not running")
    metrics_url = rec.info.metrics_url  # None or "": a worker without KVBM
    kvbm = None
    if rec.role in ROLE_NAMES and metrics_url and running:
        kvbm = read_kvbm(metrics_url, probe_timeout)
    return ServiceStatus(
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
        url=rec.info.url,
        kvbm=kvbm,
        restarts=rec.restarts,
        last_exit=(
            None
            if rec.last_exit is None
            else {**rec.last_exit.model_dump(mode="json"), "describe": rec.last_exit.describe()}
        ),
        restart_phase=rec.restart_phase,
        recovered_after_s=rec.recovered_after_s,
    )


def deployment_status(
    deployment_dir: Path | str,
    *,
    docker: DockerBackend | None = None,
    probe_timeout: float = STATUS_PROBE_TIMEOUT,
    api_key: str | None = None,
) -> StatusReport | None:
    """Each recorded service: running (pid + create_time), healthy (its probes), uptime; for
    workers, the KVBM numbers from their metrics endpoint; the frontend's router from its
    /metrics (with `api_key` when it has one). None when there is no deployment."""
    state = read_state(deployment_dir)
    if state is None:
        return None
    docker = docker or DockerBackend()
    now = time.time()
    # every service at once: a fleet's status costs one probe round, not one per service, and a
    # box busy enough to slow one answer does not add up the delays of the others
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(state.services) or 1)) as pool:
        services = list(
            pool.map(
                lambda rec: service_status(rec, docker, probe_timeout=probe_timeout, now=now),
                state.services,
            )
        )
    router = None
    for rec, svc in zip(state.services, services, strict=True):
        if rec.role == "frontend" and svc.running:
            router = read_router(rec, probe_timeout, api_key)
    return StatusReport(
        name=state.name,
        deployment_dir=str(Path(deployment_dir)),
        phase=state.phase,
        mode=state.mode,
        infra=state.infra,
        supervisor_pid=(
            state.supervisor_pid
            if same_process(state.supervisor_pid, state.supervisor_create_time)
            else None
        ),
        services=services,
        router=router,
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
    wanted = _expand(services, records) if services else list(records)
    unknown = [s for s in wanted if s not in records]
    if unknown:
        raise KeyError(", ".join(unknown))
    docker = docker or DockerBackend()
    heads: dict[str, list[str]] = {}
    sources: dict[str, LogSource] = {}
    for name in wanted:
        unit = unit_for(records[name], docker)
        follower = unit.follow(from_end=True) if follow_ else None  # first: no line in between
        end = getattr(follower, "pos", None)
        heads[name] = unit.tail(tail, end=end)
        if follower is not None:
            sources[name] = follower
    return heads, sources


def _expand(services: list[str], records: Mapping[str, object]) -> list[str]:
    """`worker` names every `worker-<i>` of a fleet (docs/fleet.md) when no service is called
    that; any other name stands for itself."""
    out: list[str] = []
    for name in services:
        fleet = [r for r in records if r.startswith(f"{name}-") and r[len(name) + 1 :].isdigit()]
        out += fleet if name not in records and fleet else [name]
    return list(dict.fromkeys(out))
