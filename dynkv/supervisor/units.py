"""A running service, whatever runs it: one small interface over processes and containers.

The run (`supervisor.run`), teardown (`supervisor.teardown`) and status/logs
(`supervisor.status`) all ask the same questions of a service (has it exited, with what code;
is it still ours; its last log lines; new lines as they come; stop it), and each question is
answered here once for a process (its pid, process group and log file) and once for a container
(the docker SDK). `unit_for(record, docker)` picks the implementation from the state record, so
it works for a service started by this process or by an `up` long gone.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Protocol

from dynkv.infra.docker import DockerBackend, DockerUnavailable
from dynkv.plan.model import Service, probe_json
from dynkv.supervisor.logs import FileFollower, IteratorFollower, LogSource, tail_lines
from dynkv.supervisor.process import await_log_writer, is_alive, prepare, spawn, stop_service
from dynkv.supervisor.state import ServiceRecord


class Unit(Protocol):
    """What the supervisor needs of a running service."""

    record: ServiceRecord

    @property
    def log_path(self) -> str:
        """Where its log is on disk ("" when the engine keeps it: a container)."""
        ...

    def exit_code(self) -> int | None:
        """None while it runs; its exit code once it has stopped (-1 when unknown)."""
        ...

    def running(self) -> bool:
        """It runs and is the one recorded (a reused pid or a replaced container is not)."""
        ...

    def tail(self, n: int | None, *, end: int | None = None) -> list[str]:
        """The last `n` log lines (all with None); a file is read up to byte `end`."""
        ...

    def follow(self, *, from_end: bool = True) -> LogSource:
        """New log lines as they arrive."""
        ...

    def stop(self, *, instance: str, grace: float) -> int:
        """Stop it (TERM, `grace` seconds, KILL); how many processes needed the KILL."""
        ...

    def reap(self) -> None:
        """Collect the exit status of a child of this process (no zombie lingers)."""
        ...


class ProcessUnit:
    """A process group started by `process.spawn`, and the writer of its log; the Popen objects
    only in the process that started them."""

    def __init__(
        self,
        record: ServiceRecord,
        popen: subprocess.Popen | None = None,
        writer: subprocess.Popen | None = None,
    ) -> None:
        self.record = record
        self.popen = popen
        self.writer = writer

    @property
    def log_path(self) -> str:
        return self.record.log

    def exit_code(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if self.running() else -1

    def running(self) -> bool:
        return is_alive(self.record)

    def tail(self, n: int | None, *, end: int | None = None) -> list[str]:
        if self.writer is not None and self.exit_code() is not None:
            # it has exited: its last lines may still be in the pipe, on their way to the file
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.writer.wait(timeout=2)
        return tail_lines(self.record.log, n, end=end)

    def follow(self, *, from_end: bool = True) -> LogSource:
        return FileFollower(self.record.log, from_end=from_end)

    def stop(self, *, instance: str, grace: float) -> int:
        killed = stop_service(self.record, instance=instance, grace=grace)
        await_log_writer(self.record)
        return killed

    def reap(self) -> None:
        for child in (self.popen, self.writer):
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=1)


class ContainerUnit:
    """A container started through the docker SDK; the engine keeps its log and exit code."""

    def __init__(self, record: ServiceRecord, docker: DockerBackend) -> None:
        self.record = record
        self.docker = docker

    @property
    def log_path(self) -> str:
        return ""

    def exit_code(self) -> int | None:
        cid = self.record.container_id
        if not cid or self.docker.is_running(cid):
            return None
        container = self.docker.get(cid)
        return int(container.attrs["State"]["ExitCode"]) if container is not None else -1

    def running(self) -> bool:
        if not self.record.container_id:
            return False
        try:
            return self.docker.is_running(self.record.container_id)
        except DockerUnavailable:
            return False

    def tail(self, n: int | None, *, end: int | None = None) -> list[str]:
        if not self.record.container_id:
            return []
        return list(self.docker.logs(self.record.container_id, tail=n, follow=False))

    def follow(self, *, from_end: bool = True) -> LogSource:
        cid = self.record.container_id or ""
        return IteratorFollower(self.docker.logs(cid, tail=0, follow=True))

    def stop(self, *, instance: str, grace: float) -> int:
        """Raises DockerUnavailable when the engine went away (the caller reports it)."""
        if self.record.container_id:
            self.docker.stop(self.record.container_id, grace)
        return 0

    def reap(self) -> None:
        pass


def unit_for(record: ServiceRecord, docker: DockerBackend) -> Unit:
    """The unit of a recorded service (the engine is contacted only when a container is asked)."""
    if record.is_container:
        return ContainerUnit(record, docker)
    return ProcessUnit(record)


def start_unit(
    service: Service,
    *,
    instance: str,
    log_path: Path,
    docker: DockerBackend,
    append: bool = False,
) -> Unit:
    """Start `service` and return its unit with the record the state file keeps (`append`: a
    restart, whose log keeps the earlier lines)."""
    if service.kind == "container":
        assert service.container is not None
        prepare(service)
        container_id = docker.start(service.container)
        record = ServiceRecord(
            name=service.name,
            role=service.role,
            kind="container",
            container_id=container_id,
            started_at=time.time(),
            ports=dict(service.ports),
            argv=list(service.container.command),
            probes=[probe_json(p) for p in service.probes],
            data_dirs=list(service.data_dirs),
            depends_on=list(service.depends_on),
            info=service.info,
        )
        return ContainerUnit(record, docker)
    spawned = spawn(service, instance=instance, log_path=log_path, append=append)
    return ProcessUnit(spawned.record, spawned.popen, spawned.writer)
