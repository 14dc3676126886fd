"""Helpers shared by the integration tests (imported by name: pytest puts this dir on sys.path)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dynkv.plan import HostFacts, ModelChoice, Plan, build_plan
from dynkv.ports import free_port
from dynkv.settings import resolve
from dynkv.supervisor.process import group_of, marked_processes, same_process
from dynkv.supervisor.runner import marker_prefix

FAKES = Path(__file__).resolve().parents[1] / "fakes"


def port_env(state_dir: Path, name: str = "it") -> dict[str, str]:
    return {
        "DYNKV_NAME": name,
        "DYNKV_STATE_DIR": str(state_dir),
        "DYNKV_ETCD_PORT": str(free_port()),
        "DYNKV_ETCD_PEER_PORT": str(free_port()),
        "DYNKV_NATS_PORT": str(free_port()),
        "DYNKV_NATS_MONITOR_PORT": str(free_port()),
        "DYNKV_WORKER_PORT": str(free_port()),
        "DYNKV_FRONTEND_PORT": str(free_port()),
        "DYN_KVBM_METRICS_PORT": str(free_port()),
        "DYN_KVBM_CPU_CACHE_GB": "0.01",
        "DYN_KVBM_DISK_CACHE_GB": "0",
    }


def full_plan(env: dict[str, str]) -> Plan:
    resolved = resolve(env=env)
    host = HostFacts.detect(resolved, ModelChoice("fake-model", "fake-model"), device="cpu")
    return build_plan(resolved, host)


def infra_plan(env: dict[str, str], **changes) -> Plan:
    """etcd + NATS only (the worker needs vLLM or the fake; the frontend needs a worker)."""
    plan = full_plan(env)
    return dataclasses.replace(
        plan, services=tuple(s for s in plan.services if s.role in ("etcd", "nats")), **changes
    )


def assert_nothing_left(pids: list[tuple[int, float]], deployment_dir: str | Path) -> None:
    """No recorded process (pid + create_time), no member of their process groups, and no
    process marked with the deployment's DYNKV_INSTANCE is left."""
    alive = [pid for pid, ct in pids if same_process(pid, ct) is not None]
    assert alive == [], f"processes still running: {alive}"
    in_groups = [p.pid for pid, _ in pids for p in group_of(pid)]
    assert in_groups == [], f"processes left in the services' groups: {in_groups}"
    assert marked_processes(marker_prefix(deployment_dir)) == []
