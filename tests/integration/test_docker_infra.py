"""`--infra docker` against a real engine: the compose images on loopback ports, found again by
labels, gone after `down`. Skips, saying why, where no engine is reachable (this box has none);
the container specs themselves are unit-tested as data (tests/unit/test_docker_specs.py)."""

from __future__ import annotations

import pytest
from infra_helpers import infra_plan

from dynkv.infra.docker import DockerBackend, DockerUnavailable, connect
from dynkv.supervisor import Supervisor, deployment_status, stop_deployment

pytestmark = pytest.mark.integration


def _engine_problem() -> str | None:
    try:
        connect()
    except DockerUnavailable as exc:
        return exc.cause
    return None


@pytest.mark.skipif(_engine_problem() is not None, reason=f"no Docker engine: {_engine_problem()}")
def test_docker_infra_up_status_down(env):
    env["DYNKV_INFRA"] = "docker"
    env["DYNKV_NAME"] = "dockertest"
    plan = infra_plan(env, startup_timeout_secs=300)  # first run pulls the images
    assert [s.kind for s in plan.services] == ["container", "container"]
    backend = DockerBackend()
    try:
        state = Supervisor(plan, docker=backend).start(detach=True)
        assert all(s.container_id for s in state.services)
        assert deployment_status(plan.deployment_dir, docker=backend).healthy
        labelled = {c.labels["dynkv.service"] for c in backend.find("dockertest")}
        assert labelled == {"etcd", "nats"}
    finally:
        report = stop_deployment(plan.deployment_dir, docker=backend, grace=5)
    assert report.found and backend.find("dockertest") == []
