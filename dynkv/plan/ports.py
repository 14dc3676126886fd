"""The port layout of a deployment, known here only: which setting places each port a service
binds, and where worker i's ports go (the setting's value + i).

The plan places ports with `worker_port`; `dynkv doctor` checks `settings_ports` (no plan yet);
`up`'s preflight checks `plan_ports` (the plan in hand); `private_deployment` picks a free value
for every `LAYOUT` variable. A new port is one more `PortSetting` row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynkv.kvbm.roles import ROLE_NAMES, Role

if TYPE_CHECKING:
    from dynkv.plan.model import Plan, Service
    from dynkv.settings import Resolved

LOOPBACK = "127.0.0.1"
WORKER_ROLES = ROLE_NAMES  # the roles whose services are vLLM workers


@dataclass(frozen=True)
class PortSetting:
    """One port variable. `name` is the key in `Service.ports` (None: the port is handed to
    vLLM and not listed by the service); `group` is the doctor check that covers it."""

    variable: str
    roles: tuple[str, ...]  # service roles that bind it
    name: str | None
    label: str
    group: str
    per_worker: bool = False  # worker i binds value + i
    host_variable: str | None = None  # the setting of its bind address, when it has one
    # Bound on the service's own address too (`ServiceInfo.bind_host`); False: this port stays
    # on loopback (or on its own `host_variable`) whatever address the rest of the service binds.
    on_service_host: bool = True
    # `up --advertise ADDR` binds it on ADDR (docs/multi-host.md); the first host's workers stay
    # on loopback, a joined node's declare its address as their `bind_host`.
    advertised: bool = False


LAYOUT: tuple[PortSetting, ...] = (  # in the order `dynkv doctor` reports them
    PortSetting(
        "DYNKV_FRONTEND_PORT",
        ("frontend",),
        "http",
        "frontend",
        "ports.frontend",
        host_variable="DYNKV_FRONTEND_HOST",
        advertised=True,
    ),
    PortSetting("DYNKV_WORKER_PORT", WORKER_ROLES, "http", "worker", "ports.workers", True),
    PortSetting(
        "DYN_KVBM_METRICS_PORT",
        WORKER_ROLES,
        "kvbm_metrics",
        "KVBM metrics",
        "ports.kvbm_metrics",
        True,
        "DYN_KVBM_METRICS_HOST",
        on_service_host=False,
    ),
    PortSetting("DYNKV_NIXL_SIDE_CHANNEL_PORT", WORKER_ROLES, None, "NIXL side channel", "", True),
    PortSetting(
        "DYNKV_ETCD_PORT", ("etcd",), "client", "etcd client", "ports.etcd", advertised=True
    ),
    PortSetting(
        "DYNKV_ETCD_PEER_PORT", ("etcd",), "peer", "etcd peer", "ports.etcd", on_service_host=False
    ),
    PortSetting(
        "DYNKV_NATS_PORT", ("nats",), "client", "NATS client", "ports.nats", advertised=True
    ),
    PortSetting(
        "DYNKV_NATS_MONITOR_PORT",
        ("nats",),
        "monitor",
        "NATS monitor",
        "ports.nats",
        on_service_host=False,
    ),
    PortSetting("DYNKV_PROMETHEUS_PORT", ("prometheus",), "http", "Prometheus", "ports.prometheus"),
)

# The setting to change when a port is taken, by (service role, port name).
PORT_SETTINGS: dict[tuple[str, str], str] = {
    (role, s.name): s.variable for s in LAYOUT if s.name for role in s.roles
}
PER_WORKER_VARIABLES = tuple(s.variable for s in LAYOUT if s.per_worker)
SHARED_VARIABLES = tuple(s.variable for s in LAYOUT if not s.per_worker)


def worker_port(base: int, index: int) -> int:
    """Worker `index`'s port of a per-worker setting whose value is `base`."""
    return base + index


def check_port_clashes(services: tuple[Service, ...]) -> None:
    """Two services binding one port, or a worker's port past 65535 (each worker takes its
    setting's value + its index): the plan cannot start (exit 2, the setting to change)."""
    from dynkv.plan.errors import PlanError
    from dynkv.ports import MAX_PORT

    seen: dict[int, str] = {}
    for svc in services:
        for pname, port in svc.ports.items():
            label = f"{svc.name} {pname}"
            setting = PORT_SETTINGS.get((svc.role, pname), "its port setting")
            if port > MAX_PORT:
                raise PlanError(
                    f"{label} would listen on port {port}, past the last port ({MAX_PORT}): "
                    "worker i takes its port setting's value + i",
                    f"export {setting}=<a port at least {port - MAX_PORT} lower>",
                )
            if port in seen:
                first = seen[port]
                raise PlanError(
                    f"port {port} is configured twice: for {first} and for {label}",
                    f"give {label} another port (export {setting}=<free port>)",
                )
            seen[port] = label


def worker_roles(topology: str) -> tuple[str, ...]:
    return (Role.AGG,) if str(topology) == "agg" else (Role.PREFILL, Role.DECODE)


@dataclass(frozen=True)
class PortUse:
    """One port to check: who binds it, on which addresses, and the setting that moves it."""

    label: str  # e.g. "frontend http", "worker 1"
    port: int
    hosts: tuple[str, ...]
    variable: str
    group: str  # the doctor check id that reports it
    offset: int = 0  # worker i = value + i
    host_variable: str | None = None


def setting_of(role: str, name: str) -> PortSetting | None:
    for s in LAYOUT:
        if s.name == name and role in s.roles:
            return s
    return None


def _hosts(svc: Service, setting: PortSetting | None) -> tuple[str, ...]:
    """Where one of `svc`'s ports is checked: loopback, and the address the service declares it
    binds (`bind_host`: the frontend's DYNKV_FRONTEND_HOST, and under `--advertise` etcd's, NATS's
    and a joined node's workers' address) unless that port stays on loopback."""
    bind = svc.info.bind_host
    if bind and bind != LOOPBACK and (setting is None or setting.on_service_host):
        return (LOOPBACK, bind)
    return (LOOPBACK,)


def plan_ports(plan: Plan) -> list[PortUse]:
    """Every host port the plan's services bind, on loopback and on a service's own bind
    address when it has another one."""
    uses = []
    worker_index = 0
    for svc in plan.services:
        index = worker_index if svc.role in WORKER_ROLES else 0
        worker_index += svc.role in WORKER_ROLES
        for name, port in svc.ports.items():
            setting = setting_of(svc.role, name)
            uses.append(
                PortUse(
                    label=f"{svc.name} {name}",
                    port=port,
                    hosts=_hosts(svc, setting),
                    variable=setting.variable if setting else "the matching DYNKV_*_PORT",
                    group=setting.group if setting else "ports.other",
                    offset=index if setting and setting.per_worker else 0,
                    host_variable=setting.host_variable if setting else None,
                )
            )
    return uses


def settings_ports(resolved: Resolved) -> list[PortUse]:
    """The ports a deployment of these settings will bind, before a plan exists (`dynkv
    doctor`): the same layout, read from the settings."""
    d, k = resolved.deployment, resolved.kvbm
    from dynkv.plan.fleet import worker_total  # fleet imports the settings this one reads

    workers = worker_total(d)
    values = {
        "DYNKV_ETCD_PORT": d.etcd_port,
        "DYNKV_ETCD_PEER_PORT": d.etcd_peer_port,
        "DYNKV_NATS_PORT": d.nats_port,
        "DYNKV_NATS_MONITOR_PORT": d.nats_monitor_port,
        "DYNKV_WORKER_PORT": d.worker_port,
        "DYN_KVBM_METRICS_PORT": k.metrics_port,
        "DYNKV_FRONTEND_PORT": d.frontend_port,
    }
    hosts = {"DYNKV_FRONTEND_HOST": d.frontend_host, "DYN_KVBM_METRICS_HOST": k.metrics_host}
    skip = set()
    if str(d.infra) == "external":
        skip |= {"DYNKV_ETCD_PORT", "DYNKV_ETCD_PEER_PORT", "DYNKV_NATS_PORT"}
        skip |= {"DYNKV_NATS_MONITOR_PORT"}
    if not (d.kvbm and k.metrics):
        skip.add("DYN_KVBM_METRICS_PORT")
    uses = []
    for s in _listed(LAYOUT):
        if s.variable in skip or s.variable not in values:
            continue
        bound: tuple[str, ...] = (hosts.get(s.host_variable or "", LOOPBACK),)
        if d.advertise and s.advertised:  # as plan_ports checks the plan of `up --advertise`
            bound = (LOOPBACK, d.advertise) if d.advertise != LOOPBACK else (LOOPBACK,)
        for i in range(workers if s.per_worker else 1):
            label = f"{s.label} {i}" if s.per_worker else s.label
            port = worker_port(values[s.variable], i) if s.per_worker else values[s.variable]
            uses.append(PortUse(label, port, bound, s.variable, s.group, i, s.host_variable))
    return uses


def _listed(layout: Iterable[PortSetting]) -> list[PortSetting]:
    return [s for s in layout if s.name is not None]
