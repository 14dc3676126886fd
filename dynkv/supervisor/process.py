"""Processes of a deployment: start one in its own session, tell whether it still runs, stop a
whole tree without leaving anything behind.

Recipes (honcho, docker compose, psutil's docs): each service is a session leader
(`start_new_session=True`), so its pgid is its pid and Ctrl-C in the user's terminal reaches only
`dynkv up`, which then stops the services in reverse order. "Is it still ours" compares psutil's
create_time with the recorded one (pids are reused). Stopping is SIGTERM to the process group →
`psutil.wait_procs` for the grace period → SIGKILL to whatever is left. Because a process can
leave its group (setsid) or outlive its parent, the set to stop also includes the recorded
descendants and every process whose environment carries this run's `DYNKV_INSTANCE` marker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from dynkv.plan.model import Service, mask_argv
from dynkv.supervisor.state import INSTANCE_ENV, ServiceRecord

CREATE_TIME_TOLERANCE = 0.05  # seconds; create_time is derived from boot time + jiffies


class SpawnError(Exception):
    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service} could not be started: {detail}")
        self.service = service
        self.detail = detail


def child_env(
    service: Service, instance: str, base: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for name in service.env_unset:
        env.pop(name, None)
    env.update(service.env)
    env[INSTANCE_ENV] = instance
    return env


def open_log(path: Path) -> int:
    """Truncate-or-create the log, private to the user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def prepare(service: Service) -> None:
    """What a service needs on disk before it starts: its data dirs (0700) and the files the plan
    generated for it (0600, e.g. Prometheus's config and the key file it reads)."""
    for d in service.data_dirs:
        Path(d).mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, text in service.files.items():
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)


def spawn(
    service: Service, *, instance: str, log_path: Path
) -> tuple[subprocess.Popen, ServiceRecord]:
    prepare(service)
    log_fd = open_log(log_path)
    try:
        popen = subprocess.Popen(
            list(service.argv),
            cwd=service.cwd,
            env=child_env(service, instance),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(service.name, f"{service.argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(log_fd)
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = None  # died at once; the health wait reports it with its log
    record = ServiceRecord(
        name=service.name,
        role=service.role,
        kind="process",
        pid=popen.pid,
        pgid=popen.pid,  # session leader
        create_time=create_time,
        started_at=time.time(),
        ports=dict(service.ports),
        log=str(log_path),
        argv=mask_argv(service.argv),
        probes=[p.to_json() for p in service.probes],
        data_dirs=list(service.data_dirs),
        meta=dict(service.meta),
    )
    return popen, record


def same_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The live process `pid` if it is the one recorded (not a zombie, not a reused pid)."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if (
            create_time is not None
            and abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE
        ):
            return None
        return proc
    except psutil.Error:
        return None


def is_alive(record: ServiceRecord) -> bool:
    return same_process(record.pid, record.create_time) is not None


def marked_processes(marker_prefix: str) -> list[psutil.Process]:
    """Live processes whose environment has DYNKV_INSTANCE starting with `marker_prefix`
    (this process and its ancestors excluded: `dynkv` may itself run inside a service)."""
    exclude = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        exclude |= {p.pid for p in psutil.Process().parents()}
    found = []
    for proc in psutil.process_iter(["environ", "status"]):
        if proc.pid in exclude or proc.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        env = proc.info.get("environ") or {}
        if env.get(INSTANCE_ENV, "").startswith(marker_prefix):
            found.append(proc)
    return found


def group_of(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def tree_of(record: ServiceRecord, instance: str) -> list[psutil.Process]:
    """Everything that belongs to a service: the leader, its descendants, and (when the leader is
    alive, so the group id is still its own) the members of its process group."""
    procs: dict[int, psutil.Process] = {}
    leader = same_process(record.pid, record.create_time)
    if leader is not None:
        procs[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                procs[child.pid] = child
        if record.pgid:
            for member in group_of(record.pgid):
                procs.setdefault(member.pid, member)
    elif record.pgid:
        # Leader gone: the group id may have been reused; keep the members marked as this run's,
        # and their descendants (vLLM's engine processes rename themselves with setproctitle,
        # which overwrites the environment that /proc shows, so they carry no readable marker).
        marked = {p.pid for p in marked_processes(instance)}
        for member in group_of(record.pgid):
            if member.pid in marked:
                procs.setdefault(member.pid, member)
        for proc in list(procs.values()):
            for child in with_descendants([proc]):
                procs.setdefault(child.pid, child)
    return list(procs.values())


def with_descendants(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """`procs` and everything below them (the processes that are still running)."""
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        found.setdefault(proc.pid, proc)
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def terminate(procs: Iterable[psutil.Process], *, grace: float, pgids: Iterable[int] = ()) -> int:
    """SIGTERM (groups, then each process) → wait `grace` → SIGKILL the rest. Returns how many
    processes had to be killed."""
    procs = [p for p in procs if p.pid != os.getpid()]
    for pgid in set(pgids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for pgid in set(pgids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if alive:
        psutil.wait_procs(alive, timeout=5)
    return len(alive)


def stop_service(record: ServiceRecord, *, instance: str, grace: float) -> int:
    procs = tree_of(record, instance)
    if not procs:
        return 0
    leader_alive = is_alive(record)
    return terminate(
        procs, grace=grace, pgids=[record.pgid] if leader_alive and record.pgid else []
    )
