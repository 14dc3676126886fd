"""What the plan needs to know about the host that will run it, gathered in one place.

`build_plan` is pure: everything it reads from the machine (interpreter, binaries, CPUs, the
inherited environment, the deployment secret, vLLM's argument parser, whether bfloat16 is native)
arrives in a `HostFacts`, which `HostFacts.detect` fills in and tests write by hand.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dynkv.plan.cpu import CPU_ENV_VARS
from dynkv.plan.dtype import cpu_bf16_native
from dynkv.plan.engine_args import detect_spec
from dynkv.plan.frontend import read_or_new
from dynkv.plan.model_source import ModelChoice
from dynkv.plan.prometheus import PROMETHEUS_BINARY
from dynkv.plan.worker import PASSTHROUGH_ENV
from dynkv.settings.resolve import Resolved
from dynkv.vllm_args import VllmArgSpec

_INHERITED = ("PYTHONPATH", *PASSTHROUGH_ENV, *CPU_ENV_VARS, "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class HostFacts:
    device: str  # "cpu" or "cuda", never "auto"
    cpus: tuple[int, ...]  # CPU ids the launcher may use (its affinity mask)
    python: str  # interpreter for python services (the worker wrapper and vLLM)
    model: ModelChoice
    etcd_binary: str = "etcd"
    nats_binary: str = "nats-server"
    environ: Mapping[str, str] = field(default_factory=dict)  # only the names in _INHERITED
    prometheus_binary: str | None = None  # None: observability runs the docker image
    nixl: bool = False  # the `nixl` package imports (vLLM's NixlConnector can run)
    user: str | None = None  # "uid:gid" a container runs as (reads the 0700 deployment dir)
    secret: str | None = None  # the deployment secret (dynkv.plan.secret); None: unsigned
    vllm_args: VllmArgSpec | None = None  # vLLM's parser, read only when there are engine args
    vllm_args_unchecked: str = "vLLM's parser was not read on the host that built this plan"
    cpu_bf16_native: bool = True  # False: a CPU worker serves float32 (dynkv.plan.dtype)

    @classmethod
    def detect(cls, resolved: Resolved, model: ModelChoice, *, device: str) -> HostFacts:
        from dynkv.infra.binaries import MissingBinary, etcd_binary, nats_server_binary

        try:
            etcd = str(etcd_binary())
        except MissingBinary:
            etcd = "etcd"  # preflight reports it with the fix
        try:
            nats = str(nats_server_binary())
        except MissingBinary:
            nats = "nats-server"
        spec, unchecked = detect_spec(resolved, sys.executable)
        return cls(
            device=device,
            cpus=tuple(sorted(os.sched_getaffinity(0))),
            python=sys.executable,
            model=model,
            etcd_binary=etcd,
            nats_binary=nats,
            environ=_inherited(os.environ),
            prometheus_binary=find_prometheus(),
            nixl=importlib.util.find_spec("nixl") is not None,
            user=f"{os.getuid()}:{os.getgid()}",
            secret=read_or_new(resolved.deployment.deployment_dir),
            vllm_args=spec,
            vllm_args_unchecked=unchecked,
            cpu_bf16_native=cpu_bf16_native(),
        )


def find_prometheus() -> str | None:
    """The prometheus binary on PATH, or Debian's /usr/bin/prometheus; None when neither."""
    found = shutil.which("prometheus")
    if found:
        return str(Path(found).resolve())
    if os.access(PROMETHEUS_BINARY, os.X_OK):
        return PROMETHEUS_BINARY
    return None


def _inherited(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the plan mentions; PYTHONPATH made absolute, since services run with the
    deployment dir as their cwd."""
    out = {k: v for k, v in environ.items() if k in _INHERITED}
    if out.get("PYTHONPATH"):
        parts = out["PYTHONPATH"].split(os.pathsep)
        out["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in parts if p)
    return out
