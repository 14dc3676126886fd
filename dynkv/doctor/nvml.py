"""NVIDIA GPUs as `doctor` needs to see them, behind an interface a test can fake.

The real implementation reads NVML through `pynvml` (package nvidia-ml-py); no CUDA runtime is
needed, so it works in a CPU-only venv and never initialises a CUDA context. Everything is read in
one `snapshot()` so handles never outlive `nvmlShutdown`, and a fake only has to hand back data:
the GPU scenarios (old driver, MIG, one GPU for disagg, compute capability 7.0) are tested on a
machine without a GPU through the fake in tests/fakes/fake_nvml.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: NVML could not tell (e.g. no permission, another container)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    memory_used: int
    compute_capability: tuple[int, int]
    mig_enabled: bool | None = None  # None: this GPU has no MIG support
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class NvmlSnapshot:
    driver_version: str  # e.g. "570.124.06"
    cuda_driver_version: int  # nvmlSystemGetCudaDriverVersion(): 12080 = CUDA 12.8
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)

    @property
    def cuda_version(self) -> tuple[int, int]:
        """The highest CUDA version the driver supports, as (major, minor)."""
        return self.cuda_driver_version // 1000, (self.cuda_driver_version % 1000) // 10

    @property
    def driver_major(self) -> int:
        try:
            return int(self.driver_version.split(".")[0])
        except ValueError:
            return 0


class NvmlUnavailable(Exception):
    """NVML could not be used. `reason`: library (no libnvidia-ml), driver (not loaded),
    permission, or error (anything else); the first two simply mean "no NVIDIA GPU here"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Nvml(Protocol):
    def snapshot(self) -> NvmlSnapshot:
        """Driver, CUDA driver version and every GPU, or raise NvmlUnavailable."""
        ...


class PynvmlNvml:
    """The real thing: nvidia-ml-py's `pynvml`, initialised and shut down per snapshot."""

    def snapshot(self) -> NvmlSnapshot:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(
                "library", f"pynvml (nvidia-ml-py) is not installed: {exc}"
            ) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise NvmlUnavailable(
                "library", "libnvidia-ml.so not found (no NVIDIA driver)"
            ) from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise NvmlUnavailable("driver", "the NVIDIA kernel driver is not loaded") from None
        except pynvml.NVMLError_NoPermission:
            raise NvmlUnavailable("permission", "no permission to open /dev/nvidia*") from None
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable("error", f"nvmlInit failed: {exc}") from None
        try:
            gpus = tuple(self._gpu(pynvml, i) for i in range(int(pynvml.nvmlDeviceGetCount())))
            return NvmlSnapshot(
                driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
                cuda_driver_version=int(pynvml.nvmlSystemGetCudaDriverVersion()),
                gpus=gpus,
            )
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable("error", f"NVML query failed: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()

    @staticmethod
    def _gpu(pynvml, index: int) -> GpuInfo:  # type: ignore[no-untyped-def]
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        mig: bool | None = None
        with contextlib.suppress(pynvml.NVMLError):  # NotSupported on GPUs without MIG
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            mig = current == pynvml.NVML_DEVICE_MIG_ENABLE
        procs: tuple[GpuProcess, ...] = ()
        with contextlib.suppress(pynvml.NVMLError):
            procs = tuple(
                GpuProcess(int(p.pid), int(p.usedGpuMemory) if p.usedGpuMemory else None)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            )
        return GpuInfo(
            index=index,
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            memory_total=int(mem.total),
            memory_used=int(mem.used),
            compute_capability=(int(major), int(minor)),
            mig_enabled=mig,
            processes=procs,
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
