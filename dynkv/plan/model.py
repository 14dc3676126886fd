"""The Plan: what `dynkv up` will start, as plain data.

A plan is built by a pure function (`dynkv.plan.build`) and consumed by the supervisor, by
`up --dry-run` and by tests. Everything a service needs to run is in its record (argv, env, cwd,
ports, how to tell it is healthy, what it waits for), so a test can assert on a plan without
starting anything and the supervisor needs no settings of its own.

The records are pydantic models, defined here once: the supervisor copies a service's probes and
`info` into the state file (`dynkv.supervisor.state`), and `status`/`down` read them back from
another process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from dynkv.kvbm.roles import ROLE_NAMES
from dynkv.tls.model import ClientTLS, TransportSecurity

ServiceKind = Literal["process", "container"]

MASK = "***"
# Names whose values are never printed: HF tokens, the frontend API key, anything secret-looking.
_SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_SECRET_FLAGS = ("--api-key", "--hf-token", "--token", "--password")
# The password of a URL's userinfo (`http://user:pw@host`): external etcd and NATS URLs may carry one.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@,]*):[^@/\s,]*@")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like a new record."""
        return self.model_validate({**dict(self), **changes})


# ---- probes: one readiness check each; a service is healthy when all of its probes pass ------


class HttpProbe(_Frozen):
    """GET `url` answers `expect_status`, and when `expect_json` is set, the body contains those
    key/value pairs (etcd's `/health` → {"health": "true"}, NATS `/healthz` → {"status": "ok"})."""

    kind: Literal["http"] = "http"
    url: str
    expect_status: int = 200
    expect_json: dict[str, Any] | None = None
    tls: ClientTLS | None = None  # https with the deployment's CA (`up --advertise`)

    def describe(self) -> str:
        return f"GET {self.url}"


class _SocketProbe(_Frozen):
    """A probe of one host:port; each subclass narrows `kind`, which `describe` names."""

    kind: str
    host: str
    port: int

    def describe(self) -> str:
        return f"{self.kind} {self.host}:{self.port}"


class TcpProbe(_SocketProbe):
    """A connection to host:port is accepted."""

    kind: Literal["tcp"] = "tcp"


class NatsProbe(_SocketProbe):
    """The server at host:port greets with an `INFO ` line (it is NATS, not just a socket)."""

    kind: Literal["nats"] = "nats"


class EtcdHealthProbe(_Frozen):
    """At least one of `endpoints` answers `/health` with {"health": "true"} (an external
    cluster may have a member down)."""

    kind: Literal["etcd_health"] = "etcd_health"
    endpoints: tuple[str, ...]
    tls: ClientTLS | None = None

    def describe(self) -> str:
        return "etcd health at " + redact_urls(",".join(self.endpoints))


class EtcdKeyProbe(_Frozen):
    """`key` exists in etcd at `endpoints` (a worker is registered, not merely listening)."""

    kind: Literal["etcd_key"] = "etcd_key"
    endpoints: tuple[str, ...]
    key: str
    tls: ClientTLS | None = None  # the CA and a client certificate (etcd requires one)

    def describe(self) -> str:
        return f"etcd key {self.key}"


Probe = Annotated[
    HttpProbe | TcpProbe | NatsProbe | EtcdHealthProbe | EtcdKeyProbe,
    Field(discriminator="kind"),
]
ProbeKind = Literal["http", "tcp", "nats", "etcd_health", "etcd_key"]
_PROBE = TypeAdapter(Probe)


def probe_json(probe: Probe, *, mask: bool = False) -> dict[str, Any]:
    """A probe as JSON: its kind and the fields it uses (a null-filled record reads as noise);
    with `mask`, as it may be printed (URL passwords hidden)."""
    data = probe.model_dump(mode="json", exclude_none=True)
    if mask and "endpoints" in data:
        data["endpoints"] = [redact_urls(e) for e in data["endpoints"]]
    return data


def probe_from_json(data: Mapping[str, Any]) -> Probe | None:
    """A probe read back from a state file; None for one this dynkv does not know (a state
    written by a newer dynkv), which `status` then reports as not understood."""
    try:
        return _PROBE.validate_python(dict(data))
    except ValidationError:
        return None


# ---- services ---------------------------------------------------------------------------------


class ServiceInfo(BaseModel):
    """What the rest of dynkv needs to know about a service beyond how to run it: where it
    answers and what it serves. Each field is set only for the services it applies to.

    Stored with the service in the state file under its historical name `meta`; unknown keys
    (a state written by a newer dynkv) are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    worker_id: str | None = None  # a worker's id, the last part of its etcd key
    url: str | None = None  # base URL of the service's HTTP endpoint
    openai_url: str | None = None  # frontend: the OpenAI API base (`url` + /v1)
    prometheus_url: str | None = None  # prometheus: where to point Grafana
    config: str | None = None  # prometheus: its generated config file
    model: str | None = None  # the served model name (workers and frontend)
    metrics_url: str | None = None  # a worker's KVBM metrics; None: KVBM off for it
    etcd_key: str | None = None  # a worker's registration key
    # the address it binds besides loopback: the frontend's, and under --advertise etcd's, NATS's
    # and a joined node's workers' (the preflight checks their ports there: dynkv.plan.ports)
    bind_host: str | None = None
    auth: Literal["bearer", "none"] | None = None  # frontend: API key required or not
    container: str | None = None  # docker infra: the container's name
    ca_cert: str | None = None  # frontend of `up --advertise`: the CA its certificate is from

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # what a service does not have is absent, not null: the state file and the dry-run
        # JSON show `meta` as it always was
        return {k: v for k, v in handler(self).items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ContainerSpec(_Frozen):
    """A docker container, in the terms of the docker SDK's `containers.run` (published ports are
    `{"4222/tcp": ("127.0.0.1", 4222)}`: loopback only). `network_mode="host"` shares the host's
    network (the container then binds 127.0.0.1 itself and publishes nothing); `volumes` are
    bind mounts `{host path: container path}`; `user` is "uid:gid" to run as."""

    image: str
    name: str
    command: tuple[str, ...]
    ports: dict[str, tuple[str, int]]
    labels: dict[str, str]
    environment: dict[str, str] = Field(default_factory=dict)
    network_mode: str | None = None
    volumes: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


class Service(_Frozen):
    """One supervised unit. `env` is added to the service's environment and `env_unset` removed
    from it; `ports` are the host ports it binds (checked free before anything starts);
    `data_dirs` are created 0700 before start and removed by `down` (etcd data, NATS store);
    `files` are written 0600 before start, path → content (a generated config), and a file whose
    name looks secret (`*api_key*`, `*token*`) has its content masked in printouts; `info` says
    where it answers (JSON: `meta`)."""

    name: str
    role: str
    argv: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    env_unset: tuple[str, ...] = ()
    cwd: str = "."
    ports: dict[str, int] = Field(default_factory=dict)
    probes: tuple[Probe, ...] = ()
    depends_on: tuple[str, ...] = ()
    log_file: str = ""
    data_dirs: tuple[str, ...] = ()
    kind: ServiceKind = "process"
    container: ContainerSpec | None = None
    info: ServiceInfo = Field(
        default_factory=ServiceInfo,
        validation_alias=AliasChoices("info", "meta"),
        serialization_alias="meta",
    )
    files: dict[str, str] = Field(default_factory=dict)

    def to_json(self, *, mask: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json", by_alias=True)
        data["probes"] = [probe_json(p, mask=mask) for p in self.probes]
        data["meta"] = self.info.to_json()
        if mask:
            data["env"] = mask_env(self.env)
            data["argv"] = mask_argv(self.argv)
            data["files"] = mask_files(self.files)
            if self.container is not None:
                data["container"]["environment"] = mask_env(self.container.environment)
        return data


class JoinedNode(_Frozen):
    """What makes a plan a joined node's (`dynkv join`, dynkv.plan.join): its name, the address
    its workers serve on, the first host's frontend, and its certificate files (the deployment
    CA's certificate, no CA key, and the node's own certificate)."""

    node: str
    advertise: str
    frontend_url: str
    security: TransportSecurity


class Plan(_Frozen):
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
    # set by `up --advertise`: certificate paths, never a secret (docs/multi-host.md)
    transport_security: TransportSecurity | None = None
    # set by `dynkv join`: a node of another host's deployment (dynkv.plan.join)
    joined: JoinedNode | None = None

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)

    @property
    def workers(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.role in ROLE_NAMES)

    def to_json(self, *, mask: bool = True) -> dict[str, Any]:
        url = redact_urls if mask else str
        data = {
            "name": self.name,
            "deployment_dir": self.deployment_dir,
            "device": self.device,
            "topology": self.topology,
            "infra": self.infra,
            "etcd_endpoints": [url(e) for e in self.etcd_endpoints],
            "nats_url": url(self.nats_url),
            "services": [s.to_json(mask=mask) for s in self.services],
            "external": [probe_json(p, mask=mask) for p in self.external],
            "notes": list(self.notes),
            "startup_timeout_secs": self.startup_timeout_secs,
        }
        if self.transport_security is not None:  # absent: a loopback plan prints as it always did
            data["transport_security"] = self.transport_security.to_json()
        if self.joined is not None:
            data["joined"] = self.joined.model_dump(mode="json", exclude_none=True)
        return data


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as it may be printed: secret-looking names keep their name, not value,
    and a URL's password is masked (`DYNKV_*_ETCD_ENDPOINTS` and a worker's
    `DYNKV_KV_EVENTS_NATS_URL` may carry one)."""
    return {k: (MASK if is_secret_name(k) and v else redact_urls(v)) for k, v in env.items()}


def mask_files(files: Mapping[str, str]) -> dict[str, str]:
    """Generated files as they may be printed: a secret-looking file name hides its content."""
    return {
        path: (MASK if is_secret_name(path.rsplit("/", 1)[-1]) and text else text)
        for path, text in files.items()
    }


def redact_urls(text: str) -> str:
    """`text` with the password of every URL in it masked (`http://user:***@host:2379`), as doctor
    reports endpoints: an external etcd or NATS URL may carry credentials."""
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", text)


def mask_argv(argv: tuple[str, ...] | list[str]) -> list[str]:
    """argv as it may be printed: the value after `--api-key` (or `--api-key=...`) is masked,
    and so is the password of any URL."""
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
        out.append(redact_urls(arg))
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
    wave_of = wave_numbers((svc.name, svc.depends_on) for svc in topological_order(services))
    count = 1 + max(wave_of.values(), default=-1)
    return tuple(tuple(s for s in services if wave_of[s.name] == i) for i in range(count))


def wave_numbers(ordered: Iterable[tuple[str, Sequence[str]]]) -> dict[str, int]:
    """Each (name, depends_on), given after everything it depends on: its start wave, one past
    the latest of its dependencies' (0 without any). A dependency not among them is ignored (a
    recorded service whose dependency runs on another host). `start_waves` starts by it, and
    `down` stops by it, reversed (`supervisor.teardown.stop_waves`)."""
    wave_of: dict[str, int] = {}
    for name, depends_on in ordered:
        wave_of[name] = 1 + max((wave_of[d] for d in depends_on if d in wave_of), default=-1)
    return wave_of
