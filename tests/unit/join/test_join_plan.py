"""A joined node's plan (`dynkv join`): workers only, in the first host's etcd and NATS over TLS,
ids and pools prefixed by the node, vLLM on the node's address over https; and the first host's
advertised plan gains the `enroll` service (docs/multi-host.md)."""

from __future__ import annotations

import json

import pytest
from plan_support import flag, host, plan_for, vllm_part

from dynkv.plan import PlanError
from dynkv.plan.join import build_join_plan
from dynkv.plan.model import EtcdKeyProbe, HttpProbe
from dynkv.settings import resolve
from dynkv.tls.model import CA_ENV, CERT_ENV, NATS_TOKEN_ENV

SECRET = "s" * 64
ETCD = ("https://127.0.0.1:2379",)
NATS = "tls://127.0.0.1:4222"


def joined(env=None, flags=None, node="hostb", **facts):
    env = {"DYNKV_STATE_DIR": "/stateb", "DYNKV_ADVERTISE": "127.0.0.2", **(env or {})}
    return build_join_plan(
        resolve(env=env, deployment_flags=flags),
        host(secret=SECRET, **facts),
        node=node,
        advertise="127.0.0.2",
        etcd_endpoints=ETCD,
        nats_url=NATS,
        nats_token="t" * 64,
        frontend_url="https://127.0.0.1:8000",
    )


def test_only_workers_no_infra_or_frontend():
    plan = joined()
    assert [s.name for s in plan.services] == ["worker"]
    assert plan.infra == "joined" and plan.transport_security is None
    assert plan.etcd_endpoints == ETCD and plan.nats_url == NATS
    assert plan.joined is not None and plan.joined.node == "hostb"
    assert plan.joined.security.ca_key == ""  # the CA key stays on the first host
    (worker,) = plan.services
    assert worker.depends_on == ()


def test_worker_ids_carry_the_node_and_records_name_it():
    plan = joined(flags={"workers": 2})
    ids = [w.info.worker_id for w in plan.workers]
    assert ids == ["hostb-agg-0", "hostb-agg-1"]
    assert [w.name for w in plan.workers] == ["worker-0", "worker-1"]
    for w in plan.workers:
        assert flag(w.argv, "--node") == "hostb"
        assert w.info.etcd_key == f"/dynkv/default/workers/{w.info.worker_id}"
        keyprobe = next(p for p in w.probes if isinstance(p, EtcdKeyProbe))
        assert keyprobe.key == w.info.etcd_key and keyprobe.endpoints == ETCD
        assert keyprobe.tls is not None and keyprobe.tls.cert.endswith("/tls/node.crt")
        assert w.env["DYNKV_KV_EVENTS_WORKER_ID"] == w.info.worker_id


def test_vllm_serves_https_on_the_node_address_with_the_node_certificate():
    (worker,) = joined().services
    vllm = vllm_part(worker.argv)
    assert flag(vllm, "--host") == "127.0.0.2"
    assert flag(vllm, "--ssl-certfile") == "/stateb/default/tls/node.crt"
    assert flag(vllm, "--ssl-keyfile") == "/stateb/default/tls/node.key"
    assert worker.info.url == "https://127.0.0.2:8100"
    assert flag(worker.argv, "--url") == "https://127.0.0.2:8100"
    health = next(p for p in worker.probes if isinstance(p, HttpProbe))
    assert health.url == "https://127.0.0.2:8100/health"
    assert health.tls.ca == "/stateb/default/tls/ca.crt"


def test_first_hosts_etcd_and_nats_with_the_token_and_the_registration_secret():
    (worker,) = joined().services
    env = worker.env
    assert env["DYNKV_WORKER_ETCD_ENDPOINTS"] == ETCD[0]
    assert env["DYNKV_KV_EVENTS_NATS_URL"] == NATS
    assert env[NATS_TOKEN_ENV] == "t" * 64
    assert env[CA_ENV] == "/stateb/default/tls/ca.crt"
    assert env[CERT_ENV] == "/stateb/default/tls/node.crt"
    assert env["DYNKV_DEPLOYMENT_SECRET"] == SECRET
    text = json.dumps(joined().to_json())
    assert "t" * 64 not in text and SECRET not in text  # printed masked


def test_pools_are_the_nodes_own():
    (worker,) = joined().services
    assert worker.env["DYN_KVBM_DISK_CACHE_DIR"].endswith("/default-hostb-agg")
    plan = joined(flags={"topology": "disagg"})
    assert [w.info.worker_id for w in plan.workers] == ["hostb-prefill-0", "hostb-decode-0"]
    assert plan.workers[0].env["DYN_KVBM_HANDOFF_DIR"] == "/dev/shm/dynkv-default-hostb"


def test_the_same_setting_checks_as_up():
    with pytest.raises(PlanError):
        joined(env={"DYNKV_BLOCK_SIZE": "16"})


def test_advertised_first_host_runs_the_enroll_service_and_loopback_does_not():
    plan = plan_for({"DYNKV_ADVERTISE": "127.0.0.1"}, secret=SECRET)
    enroll = plan.service("enroll")
    assert enroll.depends_on == ("etcd",) and enroll.ports == {}
    assert enroll.argv[1:3] == ("-m", "dynkv.join.mailbox")
    assert enroll.env["DYNKV_ENROLL_ETCD_ENDPOINTS"] == "https://127.0.0.1:2379"
    assert enroll.env[CERT_ENV].endswith("/tls/cli-client.crt")
    assert "enroll" not in {s.name for s in plan_for(secret=SECRET).services}
    assert all("enroll" not in w.depends_on for w in plan.workers)
