"""`dynkv doctor`: every pitfall of a KVBM deployment caught before anything starts, with a fix.

    results = run_checks(resolved)           # list[CheckResult], in report order
    if has_failures(results): ...            # `up` stops here; warnings never stop anything

Each check looks at one thing (NVIDIA driver vs CUDA build, vLLM build, RAM, disk tier, tier
sizes, model, ports, etcd/NATS) and says ok / warn / fail with one line of detail and, for a
problem, one line of fix. NVML sits behind `Nvml` so tests drive GPU scenarios with a fake (tests/fakes/fake_nvml.py).
"""

from dynkv.doctor.builds import BuildInfo, detect_build
from dynkv.doctor.nvml import (
    GpuInfo,
    GpuProcess,
    Nvml,
    NvmlSnapshot,
    NvmlUnavailable,
    PynvmlNvml,
)
from dynkv.doctor.result import CheckResult, Status, exit_code, has_failures, to_json
from dynkv.doctor.runner import check_ids, run_checks

__all__ = [
    "BuildInfo",
    "CheckResult",
    "GpuInfo",
    "GpuProcess",
    "Nvml",
    "NvmlSnapshot",
    "NvmlUnavailable",
    "PynvmlNvml",
    "Status",
    "check_ids",
    "detect_build",
    "exit_code",
    "has_failures",
    "run_checks",
    "to_json",
]
