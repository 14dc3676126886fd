"""Processes of a deployment: start one in its own session, tell whether it still runs, stop a
whole tree without leaving anything behind.

Recipes (honcho, docker compose, psutil's docs): each service is a session leader
(`start_new_session=True`), so its pgid is its pid and Ctrl-C in the user's terminal reaches only
`dynkv up`, which then stops the services in reverse order. "Is it still ours" compares psutil's
create_time with the recorded one (pids are reused). Stopping is SIGTERM to the process group →
`psutil.wait_procs` for the grace period → SIGKILL to whatever is left. Because a process can
leave its group (setsid) or outlive its parent, the set to stop also includes the recorded
descendants and every process whose environment carries this run's `DYNKV_INSTANCE` marker.

A service's environment is built here, not inherited whole: the infrastructure binaries (etcd,
NATS, Prometheus) get only the basics a program needs (PATH, HOME, locale, ...), and the python
services get the launcher's environment without anything secret-looking that the plan did not
give them (vLLM reads many variables of its own, which a fixed list would silently drop). So the
frontend's API key or an HF token never sits in etcd's or NATS's environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from dynkv.plan.model import Service, mask_argv, probe_json
from dynkv.supervisor.logs import LOG_KEEP, LOG_MAX_BYTES, writer_argv
from dynkv.supervisor.state import INSTANCE_ENV, ServiceRecord

CREATE_TIME_TOLERANCE = 0.05  # seconds; create_time is derived from boot time + jiffies


class SpawnError(Exception):
    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service} could not be started: {detail}")
        self.service = service
        self.detail = detail


# Roles whose program is not ours (a Go binary): the basics only.
BINARY_ROLES = frozenset({"etcd", "nats", "prometheus"})
BASIC_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR"}
)


# A secret's name ends in one of these words (HF_TOKEN, DYNKV_API_KEY, DB_PASSWORD,
# AWS_SECRET_ACCESS_KEY) or has SECRET as a word; a name that merely mentions one is no secret
# (FAKE_VLLM_TOKEN_DELAY, VLLM_MAX_TOKENS).
SECRET_WORDS = re.compile(
    r"(^|_)(TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|PASSWORD|PASSWD|CREDENTIALS?|SECRET)$"
    r"|(^|_)SECRET(_|$)",
    re.IGNORECASE,
)


def inherited_env(service: Service, environ: Mapping[str, str]) -> dict[str, str]:
    """What `service` inherits from the launcher's environment (before the plan's own `env`)."""
    if service.role in BINARY_ROLES:
        return {k: v for k, v in environ.items() if k in BASIC_ENV or k.startswith("LC_")}
    return {k: v for k, v in environ.items() if not SECRET_WORDS.search(k)}


def child_env(
    service: Service, instance: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = inherited_env(service, os.environ if base is None else base)
    for name in service.env_unset:
        env.pop(name, None)
    env.update(service.env)
    env[INSTANCE_ENV] = instance
    return env


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


@dataclass
class Spawned:
    """A started service: its process, and the writer of its log (None: it writes the file)."""

    popen: subprocess.Popen
    writer: subprocess.Popen | None
    record: ServiceRecord


def spawn(service: Service, *, instance: str, log_path: Path, append: bool = False) -> Spawned:
    """Start `service` in a session of its own, its stdout and stderr going through a pipe to the
    rotating writer of its log (`supervisor.logs`), which carries the run's marker too; `append`
    keeps the log's earlier lines (a restart within the run)."""
    prepare(service)
    read_end, write_end = os.pipe()
    try:
        writer = subprocess.Popen(
            writer_argv(sys.executable, log_path, LOG_MAX_BYTES, LOG_KEEP, append=append),
            env={INSTANCE_ENV: instance, "PATH": os.environ.get("PATH", os.defpath)},
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not cut a log short
            close_fds=True,
        )
    finally:
        os.close(read_end)
    try:
        popen = subprocess.Popen(
            list(service.argv),
            cwd=service.cwd,
            env=child_env(service, instance),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(service.name, f"{service.argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(write_end)  # the writer ends once the service and its children have gone
    record = ServiceRecord(
        name=service.name,
        role=service.role,
        kind="process",
        pid=popen.pid,
        pgid=popen.pid,  # session leader
        create_time=_started(popen.pid),  # None: died at once; the health wait reports it
        started_at=time.time(),
        ports=dict(service.ports),
        log=str(log_path),
        log_writer_pid=writer.pid,
        log_writer_create_time=_started(writer.pid),
        argv=mask_argv(service.argv),
        probes=[probe_json(p) for p in service.probes],
        data_dirs=list(service.data_dirs),
        depends_on=list(service.depends_on),
        info=service.info,
    )
    return Spawned(popen, writer, record)


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def await_log_writer(record: ServiceRecord, timeout: float = 3.0) -> None:
    """Let the writer of a stopped service's log drain the pipe and end; killed after `timeout`
    (a child that escaped the service may still hold the pipe: the marker sweep gets it)."""
    writer = same_process(record.log_writer_pid, record.log_writer_create_time)
    if writer is None:
        return
    _, alive = psutil.wait_procs([writer], timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def same_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The live process `pid` if it is the one recorded (not a zombie, not a reused pid). Without
    a recorded create_time nothing proves it is ours: None (a pid alone may be anyone's now)."""
    if pid is None or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return None
        return proc
    except psutil.Error:
        return None


def marker_prefix(deployment_dir: Path | str) -> str:
    """The DYNKV_INSTANCE prefix shared by every run of one deployment dir."""
    return f"{Path(deployment_dir).resolve()}#"


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


def terminate(
    procs: Iterable[psutil.Process],
    *,
    grace: float,
    pgids: Iterable[int] = (),
    marker: str | None = None,
) -> int:
    """SIGTERM (groups, then each process) → wait `grace` → SIGKILL the rest. Returns how many
    processes had to be killed.

    The groups get their SIGKILL only while they are still ours: a member we were stopping is
    still in it, or a member carries the run's `marker`. Once every member has gone, the group id
    is free for the kernel to hand to someone else's new session."""
    procs = [p for p in procs if p.pid != os.getpid()]
    for pgid in set(pgids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for pgid in set(pgids):
        if group_is_ours(pgid, alive, marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        psutil.wait_procs(alive, timeout=5)
    return len(alive)


def group_is_ours(pgid: int, known: Iterable[psutil.Process], marker: str | None) -> bool:
    """Process group `pgid` still holds one of the `known` processes (same pid and create_time:
    then the group id cannot have been reused), or a member carrying the run's `marker`."""
    mine = {(p.pid, _create_time(p)) for p in known}
    for member in group_of(pgid):
        if (member.pid, _create_time(member)) in mine:
            return True
        if marker is not None:
            with contextlib.suppress(psutil.Error):
                if member.environ().get(INSTANCE_ENV, "").startswith(marker):
                    return True
    return False


def _create_time(proc: psutil.Process) -> float | None:
    try:
        return round(proc.create_time(), 2)
    except psutil.Error:
        return None


def stop_service(record: ServiceRecord, *, instance: str, grace: float) -> int:
    procs = tree_of(record, instance)
    if not procs:
        return 0
    leader_alive = is_alive(record)
    return terminate(
        procs,
        grace=grace,
        pgids=[record.pgid] if leader_alive and record.pgid else [],
        marker=instance,
    )


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
        if same_process(svc.log_writer_pid, svc.log_writer_create_time):
            problems.append(f"{svc.name}'s log writer (pid {svc.log_writer_pid}) still runs")
        if svc.pgid:
            problems += [f"pid {p.pid} left in {svc.name}'s group" for p in group_of(svc.pgid)]
    problems += [
        f"pid {p.pid} still carries the deployment's marker"
        for p in marked_processes(marker_prefix(deployment_dir))
    ]
    return problems
