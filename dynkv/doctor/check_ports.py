"""Every port `up` will bind: free now, or held by this deployment (`owned_pids`). A port held by
something else is reported with its owner, so a stale dynkv is told apart from another server."""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, ok
from dynkv.ports import port_is_free, port_owner
from dynkv.settings.deployment import InfraMode

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class PortUse:
    label: str  # what binds it, e.g. "frontend", "worker 1"
    port: int
    host: str
    variable: str  # the setting that moves it
    offset: int = 0  # position in a run of ports that one variable places (worker i = base + i)


def planned_ports(ctx: DoctorContext) -> dict[str, list[PortUse]]:
    """Ports by check id; only those this configuration binds."""
    d, k, n = ctx.deployment, ctx.kvbm, ctx.workers
    groups: dict[str, list[PortUse]] = {
        "ports.frontend": [
            PortUse("frontend", d.frontend_port, d.frontend_host, "DYNKV_FRONTEND_PORT")
        ],
        "ports.workers": [
            PortUse(f"worker {i}", d.worker_port + i, LOOPBACK, "DYNKV_WORKER_PORT", i)
            for i in range(n)
        ],
    }
    if k.metrics:
        groups["ports.kvbm_metrics"] = [
            PortUse(
                f"KVBM metrics {i}", k.metrics_port + i, k.metrics_host, "DYN_KVBM_METRICS_PORT", i
            )
            for i in range(n)
        ]
    if d.infra in (InfraMode.EMBEDDED, InfraMode.DOCKER):
        groups["ports.etcd"] = [
            PortUse("etcd client", d.etcd_port, LOOPBACK, "DYNKV_ETCD_PORT"),
            PortUse("etcd peer", d.etcd_peer_port, LOOPBACK, "DYNKV_ETCD_PEER_PORT"),
        ]
        groups["ports.nats"] = [
            PortUse("NATS client", d.nats_port, LOOPBACK, "DYNKV_NATS_PORT"),
            PortUse("NATS monitor", d.nats_monitor_port, LOOPBACK, "DYNKV_NATS_MONITOR_PORT"),
        ]
    return groups


def _next_free_base(use: PortUse, run: int, taken: set[int]) -> int | None:
    """A value for `use.variable` whose whole run of ports (base .. base+run-1) is free now."""
    base = use.port - use.offset
    for candidate in range(base + 1, min(base + 200, 65536 - run)):
        ports = range(candidate, candidate + run)
        if not taken.intersection(ports) and all(_free(p, use.host) for p in ports):
            return candidate
    return None


def _free(port: int, host: str) -> bool:
    try:
        return port_is_free(port, host)
    except OSError:
        return False


def check_group(ctx: DoctorContext, uses: list[PortUse]) -> Outcome:
    owned, problems, fixes = [], [], []
    all_ports = {u.port for group in planned_ports(ctx).values() for u in group}
    for use in uses:
        try:
            free = port_is_free(use.port, use.host)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                problems.append(f"{use.host} is not an address of this host ({use.label})")
                fixes.append("use an address of this host, e.g. 127.0.0.1 (see docs/security.md)")
                continue
            raise
        if free:
            continue
        owner = port_owner(use.port)
        if owner is not None and owner.pid is not None and owner.pid in ctx.owned_pids:
            owned.append(f"{use.port} (this deployment, pid {owner.pid})")
            continue
        who = owner.describe() if owner else "a process this user cannot see (or a privileged port)"
        problems.append(f"{use.label} port {use.port} is taken by {who}")
        run = sum(1 for u in uses if u.variable == use.variable)
        alt = _next_free_base(use, run, all_ports)
        kill = f"kill {owner.pid}   # or: " if owner and owner.pid else ""
        fixes.append(f"{kill}export {use.variable}={alt or '<a free port>'}")
    ports = ", ".join(f"{u.label} {u.host}:{u.port}" for u in uses)
    if problems:
        return fail("; ".join(problems), fixes[0])
    detail = (
        f"free: {ports}"
        if not owned
        else f"{ports}: free or held by this deployment: {', '.join(owned)}"
    )
    return ok(detail)


def _group_check(check_id: str):  # type: ignore[no-untyped-def]
    def run(ctx: DoctorContext) -> Outcome | None:
        uses = planned_ports(ctx).get(check_id)
        return check_group(ctx, uses) if uses else None

    return run


def distinct(ctx: DoctorContext) -> Outcome:
    uses = [u for group in planned_ports(ctx).values() for u in group]
    counts = Counter(u.port for u in uses)
    clashes = [p for p, c in counts.items() if c > 1]
    if not clashes:
        return ok(f"{len(uses)} ports, no two the same")
    port = clashes[0]
    who = [u for u in uses if u.port == port]
    return fail(
        f"port {port} is configured for {' and '.join(u.label for u in who)}",
        f"export {who[-1].variable}=<another port>",
    )


CHECKS = [
    Check("ports.distinct", "ports do not collide", distinct),
    Check("ports.frontend", "frontend port", _group_check("ports.frontend")),
    Check("ports.workers", "worker ports", _group_check("ports.workers")),
    Check("ports.kvbm_metrics", "KVBM metrics ports", _group_check("ports.kvbm_metrics")),
    Check("ports.etcd", "etcd ports", _group_check("ports.etcd")),
    Check("ports.nats", "NATS ports", _group_check("ports.nats")),
]
