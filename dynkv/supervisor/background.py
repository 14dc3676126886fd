"""`up -d`: the deployment's supervisor runs on in the background after `up` returns, so that a
service that fails is restarted (docs/restart.md) and `dynkv restart` has someone to ask.

How: `up` forks before it starts anything. The child leaves the terminal's session, points its
stdin at /dev/null and its stdout/stderr at `logs/supervisor.log`, claims the deployment and
starts the services itself, so it is their parent and knows how each one ends (exit code or
signal). Its progress (starting, waiting, healthy, failed) comes to `up` as JSON lines on a pipe,
which `up` shows as it always did; then "ready" with the state, or "error" with what went wrong
(everything already stopped). After "ready" `up` exits and the child supervises until
`dynkv down` (SIGTERM: it stops everything, as a foreground `up` does) or the state is removed.
Ctrl-C on `up` during the start reaches the child as SIGTERM: nothing is left half-started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
from typing import Any

from dynkv.infra.docker import DockerUnavailable
from dynkv.plan.model import Service
from dynkv.supervisor.logs import tail_lines
from dynkv.supervisor.process import SpawnError
from dynkv.supervisor.run import LOG_TAIL, StartFailed, Supervisor
from dynkv.supervisor.state import DeploymentState
from dynkv.supervisor.status import AlreadyRunning
from dynkv.supervisor.teardown import Observer

SUPERVISOR_LOG = "supervisor.log"


class _PipeObserver(Observer):
    """The child's progress, one JSON line per event, for `up` to show."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, event: str, **fields: Any) -> None:
        data = (json.dumps({"event": event, **fields}) + "\n").encode()
        with contextlib.suppress(OSError):  # `up` went away: the start goes on regardless
            while data:
                data = data[os.write(self.fd, data) :]

    def starting(self, service: Service) -> None:
        self.send("starting", service=service.name)

    def waiting(self, service: Service, elapsed: float, last_line: str, detail: str) -> None:
        self.send("waiting", service=service.name, elapsed=elapsed, line=last_line, detail=detail)

    def healthy(self, service: Service, elapsed: float) -> None:
        self.send("healthy", service=service.name, elapsed=elapsed)

    def failed(self, service: Service, reason: str) -> None:
        self.send("failed", service=service.name, reason=reason)


def start_in_background(supervisor: Supervisor) -> DeploymentState:
    """Start the plan in a forked supervisor that stays; returns once every service is healthy
    (raises what a start raises otherwise). `supervisor.observer` sees the progress here."""
    supervisor.store.ensure()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the background supervisor
        os.close(read_fd)
        code = 1
        try:
            code = _run_child(supervisor, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    return _relay(supervisor, pid, read_fd)


def _run_child(supervisor: Supervisor, fd: int) -> int:
    os.setsid()  # Ctrl-C in the terminal reaches `up` only; `up` passes it on as SIGTERM

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, interrupt)
    _redirect(supervisor)
    pipe = _PipeObserver(fd)
    supervisor.observer = pipe
    try:
        state = supervisor.start(detach=True, background=True)
    except StartFailed as exc:
        pipe.send("error", kind="start_failed", service=exc.service, reason=exc.reason,
                  tail=exc.log_tail, log=exc.log)  # fmt: skip
        return 1
    except AlreadyRunning as exc:
        pipe.send("error", kind="already_running", name=exc.name, message=str(exc))
        return 1
    except SpawnError as exc:
        pipe.send("error", kind="spawn", service=exc.service, detail=exc.detail)
        return 1
    except DockerUnavailable as exc:
        pipe.send("error", kind="docker", cause=exc.cause, fix=exc.fix, args=list(exc.args))
        return 1
    except KeyboardInterrupt:
        pipe.send("error", kind="interrupted")
        return 1
    except BaseException as exc:
        pipe.send("error", kind="other", message=f"{type(exc).__name__}: {exc}")
        return 1
    pipe.send("ready", state=state.to_json())
    os.close(fd)
    print(f"[dynkv] supervising {state.name} in the background (pid {os.getpid()})", flush=True)
    try:
        supervisor.keep()
    except KeyboardInterrupt:
        print("[dynkv] asked to stop: stopping every service", flush=True)
    except Exception:  # a bug of ours must not take a serving deployment down with it
        traceback.print_exc()
        print(
            "[dynkv] the background supervisor failed; the services keep running without it "
            "(`dynkv status` says so; `dynkv down` still stops them)",
            flush=True,
        )
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the teardown must finish
    supervisor.stop()
    return 0


def _redirect(supervisor: Supervisor) -> None:
    """stdin from /dev/null, stdout and stderr to logs/supervisor.log (appended, 0600)."""
    path = supervisor.store.logs_dir / SUPERVISOR_LOG
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(log, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    # fresh stream objects: a lock another thread of `up` held at the fork stays held in ours
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _relay(supervisor: Supervisor, pid: int, fd: int) -> DeploymentState:
    """Show the child's progress; return its state once ready, raise its error otherwise."""
    with os.fdopen(fd, "rb") as pipe:
        try:
            for raw in pipe:
                event = json.loads(raw)
                state = _one(supervisor, event)
                if state is not None:
                    supervisor.state = state
                    return state
        except KeyboardInterrupt:
            # the child stops what it started (the state's supervisor is the child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(KeyboardInterrupt, OSError):
                for _ in pipe:
                    pass
            _reap(pid)
            raise
    _reap(pid)
    log = supervisor.store.logs_dir / SUPERVISOR_LOG
    raise StartFailed("supervisor", "exited during start-up", tail_lines(log, LOG_TAIL), str(log))


def _one(supervisor: Supervisor, event: dict[str, Any]) -> DeploymentState | None:
    obs, kind = supervisor.observer, event.get("event")
    if kind in ("starting", "waiting", "healthy", "failed"):
        service = supervisor.plan.service(event["service"])
        if kind == "starting":
            obs.starting(service)
        elif kind == "waiting":
            obs.waiting(service, event["elapsed"], event["line"], event["detail"])
        elif kind == "healthy":
            obs.healthy(service, event["elapsed"])
        else:
            obs.failed(service, event["reason"])
        return None
    if kind == "ready":
        return DeploymentState.from_json(event["state"])
    if kind == "error":
        raise _error(event)
    return None


def _error(event: dict[str, Any]) -> BaseException:
    kind = event.get("kind")
    if kind == "start_failed":
        return StartFailed(event["service"], event["reason"], event["tail"], event["log"])
    if kind == "already_running":
        exc = AlreadyRunning(event["name"], "")
        exc.args = (event["message"],)
        return exc
    if kind == "spawn":
        return SpawnError(event["service"], event["detail"])
    if kind == "docker":
        docker = DockerUnavailable("")
        docker.args, docker.cause, docker.fix = tuple(event["args"]), event["cause"], event["fix"]
        return docker
    if kind == "interrupted":
        return KeyboardInterrupt()
    return RuntimeError(event.get("message", "the background supervisor failed"))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
