"""Checks `dynkv up` runs before it starts anything, so a launch fails fast with a fix rather
than halfway with a stack of half-started services.

The preflight is `dynkv doctor` run with the plan in hand: the same checks and result type, with
the ports read from the plan (every port it binds, on every address it binds) and the checks that
need a plan (the programs it runs, Prometheus's engine) switched on. Failures stop `up`; warnings
are shown and do not. `up --skip-checks` skips all of it but `observability_problems`.
"""

from __future__ import annotations

from collections.abc import Collection

from dynkv.doctor.check_plan import observability
from dynkv.doctor.result import CheckResult, Status
from dynkv.doctor.runner import run_checks
from dynkv.infra.docker import DockerBackend
from dynkv.plan import Plan
from dynkv.settings import Resolved


def preflight(
    resolved: Resolved, plan: Plan, *, owned_pids: Collection[int] = (), **doctor_options
) -> list[CheckResult]:
    """Every check's result for `plan` (ok, warn and fail); `has_failures` says whether `plan`
    may start. `doctor_options` go to `run_checks` (tests pass nvml, env, build...)."""
    return run_checks(resolved, plan=plan, owned_pids=owned_pids, **doctor_options)


def problems(results: list[CheckResult]) -> list[CheckResult]:
    """The results that stop `up`."""
    return [r for r in results if r.status is Status.FAIL]


def observability_problems(plan: Plan, docker: DockerBackend | None = None) -> list[CheckResult]:
    """The one check `up --skip-checks` still runs: nothing may start when `--observability` has
    neither a prometheus binary nor a Docker engine for its image."""
    outcome = observability(plan, docker)
    if outcome is None or outcome.status is not Status.FAIL:
        return []
    return [CheckResult("infra.prometheus", outcome.status, outcome.detail, outcome.fix)]
