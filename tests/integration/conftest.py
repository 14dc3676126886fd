"""Fixtures that touch the real machine: filesystems mounted for a test (we run as root in CI),
and real etcd and NATS on ephemeral ports with a private state dir per test (other people run
tests on this box at the same time, so no fixed port such as 2379, 4222 or 8000 is assumed free).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from infra_helpers import infra_plan, port_env

from dynkv.supervisor import Supervisor, stop_deployment


def _mount(kind: str, target: Path, options: str | None = None) -> None:
    cmd = ["mount", "-t", kind]
    if options:
        cmd += ["-o", options]
    proc = subprocess.run([*cmd, kind, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {kind} here: {proc.stderr.strip() or proc.returncode}")


@pytest.fixture
def mounted(tmp_path):
    """mounted(kind, options) → a fresh mount point of that filesystem, unmounted afterwards."""
    points: list[Path] = []

    def make(kind: str, options: str | None = None) -> Path:
        target = tmp_path / f"{kind}-{len(points)}"
        target.mkdir()
        _mount(kind, target, options)
        points.append(target)
        return target

    yield make
    for target in reversed(points):
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture
def ramfs(mounted):
    """A ramfs: refuses O_DIRECT (EINVAL) and fallocate(2) (EOPNOTSUPP), unlike tmpfs and ext4."""
    return mounted("ramfs")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return port_env(tmp_path / "state")


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory):
    """One embedded etcd for the client tests, started and stopped through the supervisor."""
    env = port_env(tmp_path_factory.mktemp("etcd-state"), name="etcd-client")
    plan = infra_plan(env)
    plan = plan.replace(services=plan.services[:1])
    Supervisor(plan).start(detach=True)
    yield plan.etcd_endpoints[0]
    stop_deployment(plan.deployment_dir, grace=5)
