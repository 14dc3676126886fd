"""Every port `up` will bind: free now, or held by this deployment (`owned_pids`). A port held by
something else is reported with its owner, so a stale dynkv is told apart from another server.
Which ports those are is the plan's port layout (`dynkv.plan.ports`), read from the plan when
`up` runs the doctor as its preflight."""

from __future__ import annotations

import errno
from collections import Counter

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, ok
from dynkv.plan.ports import LOOPBACK, PortUse
from dynkv.ports import port_is_free, port_owner


def planned_ports(ctx: DoctorContext) -> dict[str, list[PortUse]]:
    """Ports by check id; only those this deployment binds (from the plan when `up` runs us)."""
    groups: dict[str, list[PortUse]] = {}
    for use in ctx.ports:
        groups.setdefault(use.group, []).append(use)
    return groups


def _next_free_base(use: PortUse, run: int, taken: set[int]) -> int | None:
    """A value for `use.variable` whose whole run of ports (base .. base+run-1) is free now."""
    base = use.port - use.offset
    for candidate in range(base + 1, min(base + 200, 65536 - run)):
        ports = range(candidate, candidate + run)
        if not taken.intersection(ports) and all(
            _free(p, host) for p in ports for host in use.hosts
        ):
            return candidate
    return None


def _free(port: int, host: str) -> bool:
    """Free on `host`; an address this host cannot bind at all is reported on its own and does
    not rule a port out."""
    try:
        return port_is_free(port, host)
    except OSError:
        return True


def _unbindable(use: PortUse, host: str, exc: OSError, taken: set[int]) -> tuple[str, str]:
    """Cause and fix for a bind address that is not this host's: move it to loopback, on a
    port that is free there (a service meant for other hosts is a choice to make on purpose)."""
    if exc.errno == errno.EADDRNOTAVAIL:
        cause = f"{host} is not an address of this host ({use.label} port {use.port})"
    else:
        cause = f"{use.label} cannot bind {host}:{use.port}: {exc.strerror or exc}"
    where = use.host_variable or "its address setting"
    if _free(use.port, LOOPBACK):
        return cause, f"export {where}=127.0.0.1"
    loopback = PortUse(use.label, use.port, (LOOPBACK,), use.variable, use.group, use.offset)
    alt = _next_free_base(loopback, 1, taken)
    return cause, f"export {where}=127.0.0.1 {use.variable}={alt or '<a free port>'}"


def _taken(ctx: DoctorContext, use: PortUse, uses: list[PortUse], all_ports: set[int]):
    """None when `use.port` is free (or this deployment's) on every host, else cause and fix;
    a string alone: held by this deployment."""
    for host in use.hosts:
        try:
            free = port_is_free(use.port, host)
        except OSError as exc:
            return _unbindable(use, host, exc, all_ports)
        if free:
            continue
        owner = port_owner(use.port)
        if owner is not None and owner.pid is not None and owner.pid in ctx.owned_pids:
            return f"{use.port} (this deployment, pid {owner.pid})"
        who = owner.describe() if owner else "a process this user cannot see (or a privileged port)"
        run = sum(1 for u in uses if u.variable == use.variable)
        alt = _next_free_base(use, run, all_ports)
        kill = f"kill {owner.pid}   # or: " if owner and owner.pid else ""
        return (
            f"{use.label} port {use.port} is taken by {who}",
            f"{kill}export {use.variable}={alt or '<a free port>'}",
        )
    return None


def check_group(ctx: DoctorContext, uses: list[PortUse]) -> Outcome:
    owned, problems, fixes = [], [], []
    all_ports = {u.port for u in ctx.ports}
    for use in uses:
        found = _taken(ctx, use, uses, all_ports)
        if isinstance(found, str):
            owned.append(found)
        elif found is not None:
            problems.append(found[0])
            fixes.append(found[1])
    ports = ", ".join(f"{u.label} {u.hosts[-1]}:{u.port}" for u in uses)
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
    uses = ctx.ports
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
    Check("ports.prometheus", "Prometheus port", _group_check("ports.prometheus")),
    Check("ports.other", "other ports", _group_check("ports.other")),
]
