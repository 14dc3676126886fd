"""Run every check against one resolved configuration; nothing a check does can stop the run.

`dynkv doctor` prints the results; `dynkv up` calls `run_checks` first and starts nothing when
`has_failures` says so. Checks run in a fixed order (settings, GPU, vLLM, memory, disk, tiers,
model, ports, infra, plan) so the report reads top-down from "what did you ask for" to "can it start".
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from dynkv.doctor import (
    check_disk,
    check_fleet,
    check_gpu,
    check_infra,
    check_memory,
    check_model,
    check_plan,
    check_ports,
    check_settings,
    check_tiers,
    check_vllm,
)
from dynkv.doctor.builds import BuildInfo
from dynkv.doctor.context import DoctorContext
from dynkv.doctor.nvml import Nvml, PynvmlNvml
from dynkv.doctor.result import Check, CheckResult, Status
from dynkv.settings import Resolved

if TYPE_CHECKING:
    from dynkv.plan import Plan

CHECKS: list[Check] = [
    *check_settings.CHECKS,
    *check_gpu.CHECKS,
    *check_vllm.CHECKS,
    *check_fleet.CHECKS,
    *check_memory.CHECKS,
    *check_disk.CHECKS,
    *check_tiers.CHECKS,
    *check_model.CHECKS,
    *check_ports.CHECKS,
    *check_infra.CHECKS,
    *check_plan.CHECKS,
]
CRASH_FIX = "a dynkv bug: please report it with the output of `dynkv doctor --json`"


def check_ids() -> list[str]:
    return [c.id for c in CHECKS]


def run_check(check: Check, ctx: DoctorContext) -> CheckResult | None:
    """One check, with any exception turned into a failed result that names it."""
    try:
        outcome = check.run(ctx)
    except Exception as exc:  # a crashing check is reported, never fatal to the run
        return CheckResult(
            check.id,
            Status.FAIL,
            f"check crashed: {type(exc).__name__}: {exc}",
            CRASH_FIX,
            check.title,
        )
    if outcome is None:
        return None
    return CheckResult(check.id, outcome.status, outcome.detail, outcome.fix, check.title)


def run_checks(
    resolved: Resolved,
    *,
    nvml: Nvml | None = None,
    owned_pids: Collection[int] = frozenset(),
    env: Mapping[str, str] | None = None,
    build: BuildInfo | None = None,
    import_vllm: bool = True,
    skip: Collection[str] = (),
    plan: Plan | None = None,
    cpu_bf16_native: bool | None = None,
) -> list[CheckResult]:
    """Every applicable check, in report order.

    nvml: the NVML implementation (default: the real one through pynvml; tests pass a fake).
    owned_pids: processes of this deployment; ports they hold count as free (`up` on a restart).
    env: the environment to read HF_*, CUDA_VISIBLE_DEVICES… from (default: os.environ).
    build: the installed vLLM/torch builds (default: read from package metadata).
    import_vllm: import vLLM and the connector in a child process (~4 s); False only looks.
    skip: check ids not to run.
    plan: the plan `up` is about to start (its preflight): ports are read from it, and the
      checks that need a plan (binaries, Prometheus) run.
    cpu_bf16_native: whether the CPU computes bfloat16 natively (default: read /proc/cpuinfo);
      without a plan it decides the dtype KV is sized in (dynkv.plan.dtype).
    """
    ctx = DoctorContext(
        resolved=resolved,
        nvml=nvml if nvml is not None else PynvmlNvml(),
        owned_pids=frozenset(owned_pids),
        env=dict(os.environ if env is None else env),
        build_info=build,
        import_vllm=import_vllm,
        plan=plan,
        cpu_bf16_native=cpu_bf16_native,
    )
    return run_in(ctx, skip=skip)


def run_in(ctx: DoctorContext, *, skip: Collection[str] = ()) -> list[CheckResult]:
    results = []
    for check in CHECKS:
        if check.id in skip:
            continue
        result = run_check(check, ctx)
        if result is not None:
            results.append(result)
    return results
