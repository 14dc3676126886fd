"""The state dir of a deployment: `<state_dir>/<name>/` (0700) with state.json (0600) and logs/.

state.json is what `status`, `logs` and `down` read, possibly from another process long after
`up -d` exited. It records, per service, the pid, the process group and psutil's create_time (a
pid alone may have been reused by an unrelated process since), ports, log path, argv, probes and
container id, plus a per-run instance id that every process of the run carries in its environment
(`DYNKV_INSTANCE`), so that teardown can find descendants that left the process group.

The dirs and files are ours alone: an existing state dir, deployment dir, logs dir, `.lock` or
state.json that another user owns, that others can write, or that is a symlink is refused with
`UnsafeStateDir` (dynkv/kvbm/paths.py; docs/security.md "Shared paths").

Every read-modify-write happens under an exclusive fcntl lock on `.lock`, and writes are atomic
(temporary file + rename), so a crash mid-write never leaves half a file and two `up`s of the
same name cannot both claim it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal as signal_module
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from dynkv.kvbm.paths import UnsafePath, check_existing_file, open_private_file, private_dir
from dynkv.plan.model import ServiceInfo
from dynkv.settings.errors import SettingsError

STATE_VERSION = 1
INSTANCE_ENV = "DYNKV_INSTANCE"


class _Kept(BaseModel):
    """Forward compatible: keys this dynkv does not know (written by a newer one) are kept and
    written back, never an error: a state that reads as corrupt would be deleted by `down`
    while its processes still run."""

    model_config = ConfigDict(extra="allow", validate_assignment=False)


class ExitRecord(_Kept):
    """How a service last ended on its own: its exit code, or the signal that killed it; both
    None when the supervisor is not its parent and cannot know (docs/restart.md)."""

    code: int | None = None
    signal: int | None = None
    at: float = 0.0  # time.time()

    @classmethod
    def from_returncode(cls, returncode: int | None, at: float) -> ExitRecord:
        """A Popen returncode (-N: killed by signal N); None: not known."""
        if returncode is None:
            return cls(at=at)
        if returncode < 0:
            return cls(signal=-returncode, at=at)
        return cls(code=returncode, at=at)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal_module.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (code unknown)"


class ServiceRecord(_Kept):
    name: str
    role: str
    kind: str = "process"  # "process" | "container"; anything else is treated as a process
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    started_at: float | None = None
    ports: dict[str, int] = Field(default_factory=dict)
    log: str = ""
    log_writer_pid: int | None = None  # the rotating writer of `log` (supervisor.logs)
    log_writer_create_time: float | None = None
    argv: list[str] = Field(default_factory=list)
    probes: list[dict[str, Any]] = Field(default_factory=list)  # plan.model.probe_json
    data_dirs: list[str] = Field(default_factory=list)
    # the services this one needed running (the plan's depends_on): it is stopped before them.
    # None in a state written before dynkv recorded it; such a state stops one service at a time
    depends_on: list[str] | None = None
    container_id: str | None = None
    info: ServiceInfo = Field(
        default_factory=ServiceInfo,
        validation_alias=AliasChoices("info", "meta"),
        serialization_alias="meta",
    )
    # restart on failure (supervisor.restarts; docs/restart.md)
    restarts: int = 0  # times this service was started again, by policy or `dynkv restart`
    last_exit: ExitRecord | None = None
    restart_phase: str = ""  # "" | "backoff" | "starting" | "given_up"
    recovered_after_s: float | None = None  # last restart: seconds from the exit to healthy

    @property
    def is_container(self) -> bool:
        return self.kind == "container"


class DeploymentState(_Kept):
    name: str
    instance: str
    infra: str
    phase: str = "starting"  # starting → running
    mode: str = "foreground"  # foreground | detached
    created_at: float = 0.0
    supervisor_pid: int | None = None
    supervisor_create_time: float | None = None
    etcd_endpoints: list[str] = Field(default_factory=list)
    services: list[ServiceRecord] = Field(default_factory=list)
    version: int = STATE_VERSION

    def service(self, name: str) -> ServiceRecord | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def uses_docker(self) -> bool:
        """Whether `down`/`status` need the Docker engine: a container service, or docker infra
        (whose containers are found by label even when the state lost their ids)."""
        return self.infra == "docker" or any(s.is_container for s in self.services)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json(cls, data: Any) -> DeploymentState:
        return cls.model_validate(data)


class StateStore:
    """The state dir of one deployment."""

    def __init__(self, deployment_dir: Path | str) -> None:
        self.dir = Path(deployment_dir)
        self.path = self.dir / "state.json"
        self.logs_dir = self.dir / "logs"

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def _fix(self) -> str:
        return (
            "remove it if it is a leftover of yours, or choose another DYNKV_STATE_DIR or "
            f"deployment name (now {self.name!r})"
        )

    @contextlib.contextmanager
    def _ours(self) -> Iterator[None]:
        """UnsafePath (a path not ours) as the CLI's cause + fix error."""
        try:
            yield
        except UnsafePath as exc:
            raise UnsafeStateDir(exc.cause, exc.fix) from None

    def ensure(self) -> None:
        """Create the dirs private to the user (a log may contain prompts), or check that the
        existing ones are ours. The state dir itself keeps its read bits (the user may have
        chosen a shared-readable one); what lies below is 0700."""
        with self._ours():
            private_dir(self.dir.parent, self._fix, tighten=False)
            private_dir(self.dir, self._fix)
            private_dir(self.logs_dir, self._fix)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.ensure()
        with self._ours():
            fd, _ = open_private_file(self.dir / ".lock", os.O_RDWR, self._fix)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> DeploymentState | None:
        try:
            with self._ours():
                fd, _ = open_private_file(self.path, os.O_RDONLY, self._fix, create=False)
            with os.fdopen(fd, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CorruptState(self.path, str(exc)) from None
        try:
            return DeploymentState.from_json(data)
        except ValidationError as exc:  # valid JSON, not a state
            detail = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'state'}: {e['msg']}" for e in exc.errors()
            )
            raise CorruptState(self.path, detail) from None

    def read_or_none(self) -> DeploymentState | None:
        """`read`, with an unreadable file counted as no state (call under lock()). Only `down`
        must tell the two apart (it reports and removes the file); everyone else uses this."""
        try:
            return self.read()
        except CorruptState:
            return None

    def snapshot(self) -> DeploymentState | None:
        """The state as it is now, read under the lock; unreadable counts as none."""
        if not self.dir.is_dir():
            return None
        with self.lock():
            return self.read_or_none()

    def write(self, state: DeploymentState) -> None:
        """Atomic replace; call under lock()."""
        self.ensure()
        with self._ours():
            check_existing_file(self.path, self._fix)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state.to_json(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def clear(self) -> None:
        """Forget the run (logs stay for a post-mortem until the next `up` overwrites them)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def restart_request_path(self) -> Path:
        """Where `dynkv restart` leaves the names for the deployment's supervisor to restart."""
        return self.dir / "restart-request.json"

    def add_restart_request(self, services: list[str]) -> None:
        """Call under lock(); merged with a request not yet taken."""
        names = self.take_restart_request()
        names += [s for s in services if s not in names]
        with self._ours():
            fd, _ = open_private_file(self.restart_request_path, os.O_WRONLY, self._fix)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"services": names}, f)

    def take_restart_request(self) -> list[str]:
        """The names asked for, and the request removed; call under lock()."""
        try:
            with self._ours():
                fd, _ = open_private_file(
                    self.restart_request_path, os.O_RDONLY, self._fix, create=False
                )
            with os.fdopen(fd, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8") or "{}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            data = {}
        with contextlib.suppress(FileNotFoundError):
            self.restart_request_path.unlink()
        names = data.get("services") if isinstance(data, dict) else None
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def log_path(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"


class UnsafeStateDir(SettingsError):
    """A state path exists but is not ours (another owner, a symlink, writable by others)."""


class CorruptState(Exception):
    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"state file {path} is unreadable: {detail}")
        self.path = path
