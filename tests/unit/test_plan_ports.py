"""Which addresses the preflight checks each port on (`dynkv.plan.ports`): loopback, plus the
address a service declares it binds, so that `up --advertise ADDR` (etcd, NATS, the frontend on
ADDR) and `join --advertise ADDR` (workers on ADDR) find a port already held there; and a
loopback plan exactly as before."""

from __future__ import annotations

from plan_support import host, plan_for

from dynkv.plan.join import build_join_plan
from dynkv.plan.ports import plan_ports, settings_ports
from dynkv.settings import resolve

SECRET = "s" * 64
ADDR = "127.0.0.2"


def hosts_by_label(uses) -> dict[str, tuple[str, ...]]:
    return {u.label: u.hosts for u in uses}


def test_a_loopback_plan_checks_every_port_on_loopback_only():
    uses = plan_ports(plan_for(secret=SECRET))
    assert uses and {u.hosts for u in uses} == {("127.0.0.1",)}


def test_an_advertised_plan_checks_etcd_nats_and_the_frontend_on_the_address():
    plan = plan_for({"DYNKV_ADVERTISE": ADDR}, secret=SECRET)
    assert plan.service("etcd").info.bind_host == ADDR == plan.service("nats").info.bind_host
    hosts = hosts_by_label(plan_ports(plan))
    both = ("127.0.0.1", ADDR)
    assert hosts["etcd client"] == hosts["nats client"] == hosts["frontend http"] == both
    # what stays on loopback in an advertised deployment is checked there only
    assert hosts["etcd peer"] == hosts["nats monitor"] == ("127.0.0.1",)
    assert hosts["worker http"] == hosts["worker kvbm_metrics"] == ("127.0.0.1",)
    assert plan.service("worker").info.bind_host is None  # the first host's workers: loopback


def test_a_joined_nodes_workers_are_checked_on_its_address():
    env = {"DYNKV_STATE_DIR": "/stateb", "DYNKV_ADVERTISE": ADDR}
    plan = build_join_plan(
        resolve(env=env),
        host(secret=SECRET),
        node="hostb",
        advertise=ADDR,
        etcd_endpoints=("https://127.0.0.1:2379",),
        nats_url="tls://127.0.0.1:4222",
        nats_token="t" * 64,
        frontend_url="https://127.0.0.1:8000",
    )
    hosts = hosts_by_label(plan_ports(plan))
    assert hosts["worker http"] == ("127.0.0.1", ADDR)
    assert hosts["worker kvbm_metrics"] == ("127.0.0.1",)  # DYN_KVBM_METRICS_HOST's, not ADDR


def test_doctor_without_a_plan_checks_the_advertised_ports_on_the_address():
    loopback = hosts_by_label(settings_ports(resolve(env={"DYNKV_STATE_DIR": "/s"})))
    assert set(loopback.values()) == {("127.0.0.1",)}
    env = {"DYNKV_STATE_DIR": "/s", "DYNKV_ADVERTISE": ADDR}
    hosts = hosts_by_label(settings_ports(resolve(env=env)))
    both = ("127.0.0.1", ADDR)
    assert hosts["etcd client"] == hosts["NATS client"] == hosts["frontend"] == both
    assert hosts["etcd peer"] == hosts["NATS monitor"] == hosts["worker 0"] == ("127.0.0.1",)


def test_a_worker_port_past_65535_is_a_usage_error_naming_the_setting():
    import pytest

    from dynkv.plan.errors import PlanError

    ok = plan_for({"DYNKV_WORKER_PORT": "65534", "DYNKV_WORKERS": "2"})
    assert [s.ports["http"] for s in ok.services if s.role == "agg"] == [65534, 65535]
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_WORKER_PORT": "65535", "DYNKV_WORKERS": "2"})
    assert "65536" in exc.value.cause and "DYNKV_WORKER_PORT" in exc.value.fix
