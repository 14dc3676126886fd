"""Real etcd and NATS on ephemeral ports with a private state dir per test: other people run
tests on this box at the same time, so no fixed port (2379, 4222, 8000) is ever assumed free."""

from __future__ import annotations

import dataclasses

import pytest
from infra_helpers import infra_plan, port_env

from dynkv.supervisor import Supervisor, stop_deployment


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return port_env(tmp_path / "state")


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory):
    """One embedded etcd for the client tests, started and stopped through the supervisor."""
    env = port_env(tmp_path_factory.mktemp("etcd-state"), name="etcd-client")
    plan = infra_plan(env)
    plan = dataclasses.replace(plan, services=plan.services[:1])
    Supervisor(plan).start(detach=True)
    yield plan.etcd_endpoints[0]
    stop_deployment(plan.deployment_dir, grace=5)
