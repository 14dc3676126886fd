"""Stop a deployment, from the process that runs it or from any other (`dynkv down`).

The rules this module keeps:
- Stopping goes by the start waves reversed, the services of a wave together (`stop_waves`),
  then sweeps every process carrying the run's `DYNKV_INSTANCE` marker (descendants that
  escaped their process group) and removes the services' data dirs (etcd data, NATS store).
  Logs are kept for a post-mortem.
- A foreground or still-starting `up` tears its own services down when told to (SIGTERM): `down`
  asks it first and gives it the time, rather than racing it.
- `down` is idempotent and stops what it can find even without a readable state: processes
  that carry the deployment's marker, containers that carry its label.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from dynkv.infra.docker import DockerBackend, DockerUnavailable
from dynkv.plan.model import Service, wave_numbers
from dynkv.supervisor.process import (
    marked_processes,
    marker_prefix,
    same_process,
    terminate,
    with_descendants,
)
from dynkv.supervisor.state import CorruptState, DeploymentState, ServiceRecord, StateStore
from dynkv.supervisor.units import unit_for

DEFAULT_GRACE = 10.0


class Observer:
    """What `up` shows while it works; the CLI renders it with rich, tests ignore it."""

    def starting(self, service: Service) -> None: ...

    def waiting(self, service: Service, elapsed: float, last_line: str, detail: str) -> None: ...

    def healthy(self, service: Service, elapsed: float) -> None: ...

    def failed(self, service: Service, reason: str) -> None: ...

    def stopping(self, name: str) -> None: ...


@dataclass
class StopReport:
    found: bool
    stopped: list[str] = field(default_factory=list)
    killed: int = 0  # processes that needed SIGKILL
    stragglers: int = 0  # processes found only by their DYNKV_INSTANCE marker
    containers: int = 0
    warnings: list[str] = field(default_factory=list)


def stop_state(
    state: DeploymentState,
    store: StateStore,
    *,
    grace: float,
    docker: DockerBackend | None = None,
    observer: Observer | None = None,
    clear: bool = True,
) -> StopReport:
    """Stop every service of `state` (call under the state lock)."""
    docker = docker or DockerBackend()  # contacted only for a container service
    report = StopReport(found=True)

    def stop(record: ServiceRecord) -> int | DockerUnavailable:
        try:
            return unit_for(record, docker).stop(instance=state.instance, grace=grace)
        except DockerUnavailable as exc:
            return exc

    for wave in stop_waves(state.services):
        if observer:
            for record in wave:
                # a display that lost its terminal (EIO) or its reader (rich: SystemExit) must
                # not cut the teardown short
                with contextlib.suppress(OSError, SystemExit):
                    observer.stopping(record.name)
        # a fleet's workers stop together: `down` waits for the slowest, not for their sum
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            outcomes = list(pool.map(stop, wave))
        for record, outcome in zip(wave, outcomes, strict=True):
            if isinstance(outcome, DockerUnavailable):
                report.warnings.append(f"{record.name}: {outcome.cause}")
            else:
                report.killed += outcome
                report.containers += int(record.is_container and bool(record.container_id))
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


def stop_waves(services: Sequence[ServiceRecord]) -> list[list[ServiceRecord]]:
    """The start waves reversed: every service stops before the services it depends on (a
    worker deregisters while etcd still runs), and the services of one wave stop together. A
    state written before dynkv recorded `depends_on` stops one service at a time, in reverse
    start order."""
    if any(record.depends_on is None for record in services):
        return [[record] for record in reversed(services)]
    # start order: what a service depends on was started before it
    wave_of = wave_numbers((record.name, record.depends_on or ()) for record in services)
    last = max(wave_of.values(), default=-1)
    return [
        [record for record in reversed(services) if wave_of[record.name] == wave]
        for wave in range(last, -1, -1)
    ]


def _remove_inside(path: Path, root: Path) -> None:
    """rmtree, but only below the deployment dir, or a disagg handoff pool in /dev/shm named
    dynkv-<name> (a state file is not trusted to name anything else)."""
    resolved = path.resolve()
    shm_pool = resolved.parent == Path("/dev/shm") and resolved.name.startswith("dynkv-")
    if shm_pool:
        # /dev/shm is everyone's: only a real directory of ours (docs/security.md, Shared paths)
        try:
            info = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return
    else:
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
    if not store.dir.is_dir():
        return StopReport(found=False)
    docker = docker or DockerBackend()
    state = store.snapshot()
    # what the running supervisor stopped itself, when asked (foreground or background `up`)
    handed_over = state.services if state is not None and _stop_supervisor(state, grace) else []
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
            report = stop_state(state, store, grace=grace, docker=docker, observer=observer)
        if state is None and handed_over:
            report.found = True
            report.stopped = [rec.name for rec in reversed(handed_over)]
        if warning:
            report.warnings.append(warning)
        orphans = with_descendants(marked_processes(marker_prefix(deployment_dir)))
        if orphans:
            report.found = True
            report.stragglers += len(orphans)
            report.killed += terminate(orphans, grace=min(grace, 3.0))
        report.containers += _remove_labelled_containers(store.name, docker, grace, report, state)
    return report


def _stop_supervisor(state: DeploymentState, grace: float) -> bool:
    """Ask the process that supervises the deployment (a foreground or still-starting `up`, or
    the background supervisor of `up -d`) to tear down its own services (SIGTERM), and give it
    the time to, rather than race it (or have it restart what `down` stops). True when asked."""
    if state.supervisor_pid is None or state.supervisor_pid == os.getpid():
        return False
    proc = same_process(state.supervisor_pid, state.supervisor_create_time)
    if proc is None:
        return False
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGTERM)
        _wait_gone(proc, grace * 2 + 5)
    return True


def _wait_gone(proc: psutil.Process, timeout: float) -> None:
    """Until `proc` has exited. A zombie counts as gone: the background supervisor of an `up -d`
    run inside another program (a test) stays one until that program reaps it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
            proc.wait(timeout=0.1)
            return
        except psutil.TimeoutExpired:
            continue
        except psutil.NoSuchProcess:
            return


def _remove_labelled_containers(
    name: str,
    docker: DockerBackend,
    grace: float,
    report: StopReport,
    state: DeploymentState | None,
) -> int:
    """Containers labelled with the deployment, as compose finds its project's containers. Only
    asked of an engine when one is expected (docker infra, or no state to tell)."""
    if state is not None and not state.uses_docker:
        return 0
    try:
        found = docker.find(name)
    except DockerUnavailable as exc:
        if state is not None:  # a docker deployment whose engine went away
            report.warnings.append(exc.cause)
        return 0
    for container in found:
        docker.remove(container, grace)
        report.found = True
    return len(found)
