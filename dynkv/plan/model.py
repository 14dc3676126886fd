"""The Plan: what `dynkv up` will start, as plain data.

A plan is built by a pure function (`dynkv.plan.build`) and consumed by the supervisor, by
`up --dry-run` and by tests. Everything a service needs to run is in its record (argv, env, cwd,
ports, how to tell it is healthy, what it waits for), so a test can assert on a plan without
starting anything and the supervisor needs no settings of its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ProbeKind = Literal["http", "tcp", "nats", "etcd_health", "etcd_key"]
ServiceKind = Literal["process", "container"]

MASK = "***"
# Names whose values are never printed: HF tokens, the frontend API key, anything secret-looking.
_SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_SECRET_FLAGS = ("--api-key", "--hf-token", "--token", "--password")


@dataclass(frozen=True)
class Probe:
    """One readiness check; a service is healthy when all of its probes pass.

    http: GET `url`, status `expect_status`, and when `expect_json` is set, the body must contain
    those key/value pairs (etcd's `/health` → {"health": "true"}, NATS `/healthz` → {"status": "ok"}).
    tcp: a connection to host:port is accepted. nats: the server greets with an `INFO ` line.
    etcd_health: at least one of `endpoints` answers `/health` with {"health": "true"} (an
    external cluster may have a member down). etcd_key: `key` exists in etcd at `endpoints` (a
    worker is registered, not merely listening).
    """

    kind: ProbeKind
    url: str | None = None
    expect_status: int = 200
    expect_json: Mapping[str, Any] | None = None
    host: str | None = None
    port: int | None = None
    endpoints: tuple[str, ...] = ()
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Only the fields this kind of probe uses (a null-filled record reads as noise)."""
        data = _plain(asdict(self))
        used = {
            "http": ("url", "expect_status", "expect_json"),
            "tcp": ("host", "port"),
            "nats": ("host", "port"),
            "etcd_health": ("endpoints",),
            "etcd_key": ("endpoints", "key"),
        }[self.kind]
        return {"kind": self.kind, **{k: data[k] for k in used if data[k] is not None}}

    def describe(self) -> str:
        if self.kind == "http":
            return f"GET {self.url}"
        if self.kind in ("tcp", "nats"):
            return f"{self.kind} {self.host}:{self.port}"
        if self.kind == "etcd_health":
            return "etcd health at " + ",".join(self.endpoints)
        return f"etcd key {self.key}"


@dataclass(frozen=True)
class ContainerSpec:
    """A docker container, in the terms of the docker SDK's `containers.run` (published ports are
    `{"4222/tcp": ("127.0.0.1", 4222)}`: loopback only). `network_mode="host"` shares the host's
    network (the container then binds 127.0.0.1 itself and publishes nothing); `volumes` are
    bind mounts `{host path: container path}`; `user` is "uid:gid" to run as."""

    image: str
    name: str
    command: tuple[str, ...]
    ports: Mapping[str, tuple[str, int]]
    labels: Mapping[str, str]
    environment: Mapping[str, str] = field(default_factory=dict)
    network_mode: str | None = None
    volumes: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None


@dataclass(frozen=True)
class Service:
    """One supervised unit. `env` is added to the inherited environment and `env_unset` removed
    from it; `ports` are the host ports it binds (checked free before anything starts);
    `data_dirs` are created 0700 before start and removed by `down` (etcd data, NATS store);
    `files` are written 0600 before start, path → content (a generated config), and a file whose
    name looks secret (`*api_key*`, `*token*`) has its content masked in printouts."""

    name: str
    role: str
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    env_unset: tuple[str, ...] = ()
    cwd: str = "."
    ports: Mapping[str, int] = field(default_factory=dict)
    probes: tuple[Probe, ...] = ()
    depends_on: tuple[str, ...] = ()
    log_file: str = ""
    data_dirs: tuple[str, ...] = ()
    kind: ServiceKind = "process"
    container: ContainerSpec | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)

    def to_json(self, *, mask: bool = True) -> dict[str, Any]:
        data = _plain(asdict(self))
        data["probes"] = [p.to_json() for p in self.probes]
        if mask:
            data["env"] = mask_env(self.env)
            data["argv"] = mask_argv(self.argv)
            data["files"] = mask_files(self.files)
            if self.container is not None:
                data["container"]["environment"] = mask_env(self.container.environment)
        return data


@dataclass(frozen=True)
class Plan:
    """A deployment as data. `services` are in start order (dependencies first); `external` are
    probes of endpoints someone else runs (external infra mode): checked, never started."""

    name: str
    deployment_dir: str
    device: str
    topology: str
    infra: str
    etcd_endpoints: tuple[str, ...]
    nats_url: str
    services: tuple[Service, ...]
    external: tuple[Probe, ...] = ()
    notes: tuple[str, ...] = ()
    startup_timeout_secs: float = 900.0

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    @property
    def workers(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.role in ("agg", "prefill", "decode"))

    def to_json(self, *, mask: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "deployment_dir": self.deployment_dir,
            "device": self.device,
            "topology": self.topology,
            "infra": self.infra,
            "etcd_endpoints": list(self.etcd_endpoints),
            "nats_url": self.nats_url,
            "services": [s.to_json(mask=mask) for s in self.services],
            "external": [p.to_json() for p in self.external],
            "notes": list(self.notes),
            "startup_timeout_secs": self.startup_timeout_secs,
        }


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as it may be printed: secret-looking names keep their name, not value."""
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in env.items()}


def mask_files(files: Mapping[str, str]) -> dict[str, str]:
    """Generated files as they may be printed: a secret-looking file name hides its content."""
    return {
        path: (MASK if is_secret_name(path.rsplit("/", 1)[-1]) and text else text)
        for path, text in files.items()
    }


def mask_argv(argv: tuple[str, ...] | list[str]) -> list[str]:
    """argv as it may be printed: the value after `--api-key` (or `--api-key=...`) is masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


def topological_order(services: tuple[Service, ...]) -> tuple[Service, ...]:
    """Services with every dependency before its dependents, stable for independent ones.

    Raises ValueError on an unknown dependency or a cycle: both are bugs in the plan builder."""
    by_name = {s.name: s for s in services}
    for svc in services:
        for dep in svc.depends_on:
            if dep not in by_name:
                raise ValueError(f"service {svc.name!r} depends on unknown {dep!r}")
    done: list[Service] = []
    seen: set[str] = set()
    visiting: set[str] = set()

    def visit(svc: Service) -> None:
        if svc.name in seen:
            return
        if svc.name in visiting:
            raise ValueError(f"dependency cycle through {svc.name!r}")
        visiting.add(svc.name)
        for dep in svc.depends_on:
            visit(by_name[dep])
        visiting.discard(svc.name)
        seen.add(svc.name)
        done.append(svc)

    for svc in services:
        visit(svc)
    return tuple(done)


def start_waves(services: tuple[Service, ...]) -> tuple[tuple[Service, ...], ...]:
    """`services` grouped into waves that start together: each service in the first wave after
    all of its dependencies, plan order kept within a wave. Independent services then load at the
    same time (a disagg deployment's prefill and decode workers each take minutes to load a model
    on their own GPU, or their own cores), and a service still never starts before what it needs
    is healthy."""
    wave_of: dict[str, int] = {}
    for svc in topological_order(services):
        wave_of[svc.name] = 1 + max((wave_of[d] for d in svc.depends_on), default=-1)
    count = 1 + max(wave_of.values(), default=-1)
    return tuple(tuple(s for s in services if wave_of[s.name] == i) for i in range(count))


def _plain(value: Any) -> Any:
    """asdict() output → JSON types (tuples → lists, mappings → dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
