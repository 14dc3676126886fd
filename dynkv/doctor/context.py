"""Facts several checks share, each gathered once, lazily, per run.

Checks read the machine through this object only, so a test swaps a fact (NVML, the installed
builds, the environment) without patching modules, and a fact that blows up makes only the checks
that need it crash (each reported as a fail), never the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from dynkv.doctor import builds, model, probe_cache, vllm_probe
from dynkv.doctor.nvml import Nvml, NvmlSnapshot, NvmlUnavailable, PynvmlNvml
from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.paths import holder_problem
from dynkv.model.presets import kv_bytes_per_token
from dynkv.plan.dtype import argv_dtype
from dynkv.settings import Resolved
from dynkv.settings.deployment import DeploymentSettings, Device, Topology

if TYPE_CHECKING:
    from dynkv.plan import Plan
    from dynkv.plan.ports import PortUse


@dataclass
class DiskDirState:
    path: Path
    ok: bool
    created: bool = False
    error: str | None = None


@dataclass
class DoctorContext:
    resolved: Resolved
    nvml: Nvml = field(default_factory=PynvmlNvml)
    owned_pids: Collection[int] = frozenset()
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    build_info: builds.BuildInfo | None = None
    import_vllm: bool = True
    plan: Plan | None = None  # `up`'s preflight: the plan it is about to start
    cpu_ids: Collection[int] | None = None  # None: this process's affinity mask
    cpu_bf16_native: bool | None = None  # None: read /proc/cpuinfo (dynkv.plan.dtype)

    @cached_property
    def ports(self) -> list[PortUse]:
        """Every port the deployment binds: read from the plan when there is one, else laid out
        from the settings by the same rules (`dynkv.plan.ports`)."""
        from dynkv.plan.ports import plan_ports, settings_ports

        return plan_ports(self.plan) if self.plan is not None else settings_ports(self.resolved)

    @property
    def kvbm(self) -> KvbmSettings:
        """The runtime's settings as the workers will see them: with the connector off
        (DYNKV_KVBM=false) no tier and no metrics exist, so the tier, disk and metrics-port
        checks find nothing to check instead of checking what will never start."""
        if not self.resolved.deployment.kvbm:
            return self.resolved.kvbm.model_copy(
                update={
                    "cpu_cache_gb": None,
                    "disk_cache_gb": None,
                    "cpu_cache_override_num_blocks": None,
                    "disk_cache_override_num_blocks": None,
                    "metrics": False,
                }
            )
        return self.resolved.kvbm

    @property
    def deployment(self) -> DeploymentSettings:
        return self.resolved.deployment

    # --- GPUs -------------------------------------------------------------------------------
    @cached_property
    def nvml_result(self) -> NvmlSnapshot | NvmlUnavailable:
        try:
            return self.nvml.snapshot()
        except NvmlUnavailable as exc:
            return exc

    @property
    def snapshot(self) -> NvmlSnapshot | None:
        return self.nvml_result if isinstance(self.nvml_result, NvmlSnapshot) else None

    @property
    def gpu_count(self) -> int:
        return len(self.snapshot.gpus) if self.snapshot else 0

    @property
    def device(self) -> str:
        """Where G1 lives: the requested device, with `auto` resolved as `up` resolves it
        (dynkv.hardware.resolve_device), but from this run's NVML so a fake drives it."""
        requested = self.deployment.device
        if requested != Device.AUTO:
            return str(requested)
        return "cuda" if self.gpu_count > 0 else "cpu"

    @cached_property
    def forward_compat_dir(self) -> str | None:
        return builds.forward_compat_dir(self.env)

    # --- software ---------------------------------------------------------------------------
    @cached_property
    def build(self) -> builds.BuildInfo:
        return self.build_info if self.build_info is not None else builds.detect_build()

    @cached_property
    def import_probe(self) -> vllm_probe.ProbeResult | None:
        """vLLM and the connector imported in a child process (None when import_vllm is off)."""
        if not self.import_vllm:
            return None
        return probe_cache.cached_probe(vllm_probe.probe)

    # --- topology and model -----------------------------------------------------------------
    @property
    def workers(self) -> int:
        """Every worker of the fleet (`--workers`, or prefill + decode workers)."""
        from dynkv.plan.fleet import worker_total

        return worker_total(self.deployment)

    @property
    def tiered_workers(self) -> int:
        """Workers that hold G2 and G3: all of them in agg; in disagg the prefill workers only,
        since a decode worker with KVBM is tierless (it reads the handoff pool)."""
        if self.deployment.topology == Topology.DISAGG:
            return self.deployment.prefill_workers
        return self.workers

    @cached_property
    def cpus(self) -> tuple[int, ...]:
        """The CPU ids the launcher may use (the plan splits them among CPU workers)."""
        return tuple(sorted(self.cpu_ids if self.cpu_ids is not None else os.sched_getaffinity(0)))

    @cached_property
    def model(self) -> model.ModelSource:
        return model.locate_model(self.deployment.model, self.env)

    @cached_property
    def kv_bytes_per_token(self) -> int | None:
        if not self.model.config:
            return None
        try:
            return kv_bytes_per_token(self.model.config, self.serving_dtype)
        except (KeyError, ValueError, TypeError):
            return None

    @property
    def serving_dtype(self) -> str | None:
        """The dtype the workers compute in (`--dtype`, e.g. the float32 fallback of CPUs without
        AMX: dynkv.plan.dtype); None: the model's own. Read from the plan's command lines when
        there is a plan, else worked out as `up` would: a standalone `doctor` sizes KV in the
        same dtype as the deployment it precedes."""
        return argv_dtype(self.worker_argv)

    @property
    def worker_argv(self) -> tuple[str, ...]:
        """The vLLM words dynkv appends for a worker: the plan's first worker, else the engine
        arguments of the settings (first role) plus the dtype default `up` would add."""
        if self.plan is not None:
            return tuple(self.plan.workers[0].argv) if self.plan.workers else ()
        from dynkv.plan.dtype import cpu_bf16_native, default_dtype_argv
        from dynkv.plan.engine_args import role_argv

        role = "agg" if self.deployment.topology == "agg" else "prefill"
        engine = role_argv(self.resolved, role, None)
        native = self.cpu_bf16_native if self.cpu_bf16_native is not None else cpu_bf16_native()
        return default_dtype_argv(self.device, native, engine) + engine

    @property
    def bytes_per_block(self) -> int | None:
        kvbpt = self.kv_bytes_per_token
        return None if kvbpt is None else kvbpt * self.deployment.block_size

    def host_tier_bytes(self) -> int | None:
        """G2 per worker in bytes (None: sized in blocks and the block size in bytes is unknown)."""
        return self._tier_bytes(self.kvbm.cpu_cache_gb, self.kvbm.cpu_cache_override_num_blocks)

    def disk_tier_bytes(self) -> int | None:
        return self._tier_bytes(self.kvbm.disk_cache_gb, self.kvbm.disk_cache_override_num_blocks)

    def _tier_bytes(self, gb: float | None, override: int | None) -> int | None:
        if override:
            bpb = self.bytes_per_block
            return None if bpb is None else override * bpb
        return int((gb or 0) * 1e9)

    # --- disk tier --------------------------------------------------------------------------
    @cached_property
    def disk_dir(self) -> DiskDirState:
        """The G3 directory, created 0700 (it holds KV of users' prompts) when missing."""
        path = Path(self.kvbm.disk_cache_dir).expanduser()
        existed = os.path.isdir(path)  # not Path.is_dir: 3.11's raises on too long a name
        try:
            # each worker's pool dir goes inside: nobody else may be able to swap it
            # (docs/security.md, Shared paths)
            why = holder_problem(path) if existed else None
        except OSError:
            why = None
        if why is not None:
            return DiskDirState(
                path, False, error=f"it {why}: other users could swap the pool directories in it"
            )
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            return DiskDirState(path, False, error=f"cannot create it: {exc.strerror or exc}")
        probe = path / f".dynkv-doctor-write-{os.getpid()}"
        try:
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            return DiskDirState(path, False, error=f"not writable: {exc.strerror or exc}")
        return DiskDirState(path, True, created=not existed)
