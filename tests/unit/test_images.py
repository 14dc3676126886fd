"""Container images: the settings that pin them by digest reach the plan, and the `plan.images`
check warns about every image the plan would run by tag alone (docs/security.md, "Supply chain")."""

from __future__ import annotations

import plan_support
import pytest

from dynkv.doctor.check_plan import images
from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Status
from dynkv.infra.images import ETCD_IMAGE, NATS_IMAGE, is_pinned, reference_problem
from dynkv.plan import build_plan
from dynkv.settings import SettingsError, resolve

DIGEST = "sha256:" + "0123456789abcdef" * 4


def plan_for(env: dict[str, str], prometheus: str | None = "/usr/bin/prometheus"):
    base = {"DYNKV_STATE_DIR": "/state"}
    host = plan_support.host(prometheus_binary=prometheus, user="1000:1000")
    return build_plan(resolve(env={**base, **env}), host)


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("nats:2.11.4", False),
        ("quay.io/coreos/etcd:v3.6.1", False),
        (f"nats:2.11.4@{DIGEST}", True),
        (f"localhost:5000/mirror/etcd@{DIGEST}", True),
        ("nats@sha256:abc", False),  # too short: not a digest
    ],
)
def test_is_pinned(ref, pinned):
    assert is_pinned(ref) is pinned


@pytest.mark.parametrize(
    "bad", ["Nats:1", "nats:1 ; rm", "nats@sha256:XYZ", "nats@md5:" + "a" * 32]
)
def test_bad_references_are_refused(bad):
    # (an empty DYNKV_NATS_IMAGE is unset, as for every setting: the default tag)
    assert reference_problem(bad)
    with pytest.raises(SettingsError):
        resolve(env={"DYNKV_NATS_IMAGE": bad})


def test_pinned_images_from_the_settings_reach_the_containers():
    env = {
        "DYNKV_INFRA": "docker",
        "DYNKV_OBSERVABILITY": "true",
        "DYNKV_ETCD_IMAGE": f"{ETCD_IMAGE}@{DIGEST}",
        "DYNKV_NATS_IMAGE": f"{NATS_IMAGE}@{DIGEST}",
        "DYNKV_PROMETHEUS_IMAGE": f"prom/prometheus:v2.42.0@{DIGEST}",
    }
    plan = plan_for(env, prometheus=None)
    containers = {s.name: s.container.image for s in plan.services if s.container is not None}
    assert containers == {
        "etcd": f"{ETCD_IMAGE}@{DIGEST}",
        "nats": f"{NATS_IMAGE}@{DIGEST}",
        "prometheus": f"prom/prometheus:v2.42.0@{DIGEST}",
    }
    outcome = images(DoctorContext(resolved=resolve(env=env), plan=plan))
    assert outcome.status is Status.OK and "3 container images pinned" in outcome.detail


def test_unpinned_images_get_a_warning_with_the_fix():
    env = {"DYNKV_INFRA": "docker", "DYNKV_NATS_IMAGE": f"{NATS_IMAGE}@{DIGEST}"}
    plan = plan_for(env)
    outcome = images(DoctorContext(resolved=resolve(env=env), plan=plan))
    assert outcome.status is Status.WARN
    assert f"{ETCD_IMAGE} (etcd)" in outcome.detail and NATS_IMAGE + " " not in outcome.detail
    assert "DYNKV_ETCD_IMAGE" in outcome.fix and "@sha256:" in outcome.fix
    # `dynkv doctor` has no plan: the settings say which images --infra docker would run
    no_plan = images(DoctorContext(resolved=resolve(env=env)))
    assert no_plan.status is Status.WARN and "(etcd)" in no_plan.detail


def test_no_container_no_check():
    env = {"DYNKV_INFRA": "embedded"}
    assert images(DoctorContext(resolved=resolve(env=env), plan=plan_for(env))) is None
    assert images(DoctorContext(resolved=resolve(env=env))) is None
