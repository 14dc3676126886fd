"""Plans for hosts described by hand: the plan is pure, so the unit tests build a CUDA host's
plan on this CPU box (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynkv.plan import HostFacts, ModelChoice, Plan, build_plan
from dynkv.settings import resolve

MODEL = ModelChoice("/models/tiny", "dynkv-tiny", random_weights=True)


def host(device: str = "cpu", **facts: Any) -> HostFacts:
    """A two-core host with the binaries in place; `facts` override any field."""
    base: dict[str, Any] = {
        "device": device,
        "cpus": (0, 1),
        "python": "/venv/bin/python",
        "model": MODEL,
        "etcd_binary": "/bin/etcd",
        "nats_binary": "/bin/nats-server",
        "environ": {},
    }
    return HostFacts(**(base | facts))


def plan_for(
    env: Mapping[str, str] | None = None,
    device: str = "cpu",
    tmp: Path | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    **facts: Any,
) -> Plan:
    """The plan of `env` (state dir /state unless `tmp`), deployment `flags` as the CLI passes
    them, on `host(device, **facts)`."""
    env = {"DYNKV_STATE_DIR": str(tmp or "/state"), **(env or {})}
    return build_plan(resolve(env=env, deployment_flags=flags), host(device, **facts))


def vllm_part(argv) -> list[str]:
    """The vLLM command line inside a worker's argv (after the wrapper's `--`)."""
    argv = list(argv)
    return argv[argv.index("--") + 1 :]


def flag(argv, name: str) -> str:
    argv = list(argv)
    return argv[argv.index(name) + 1]
