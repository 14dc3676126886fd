"""Every worker with KVBM is told where to publish its KV events (docs/kv-events.md), as data."""

from __future__ import annotations

from plan_support import plan_for

from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.kvbm.events import events_subject


def events_env(worker) -> dict[str, str]:
    return {k: v for k, v in worker.env.items() if k in KvEventsSettings.env_names()}


def test_agg_worker_publishes_on_the_deployments_nats():
    plan = plan_for({"DYNKV_NAME": "prod.eu", "DYNKV_NATS_PORT": "4333"})
    env = events_env(plan.service("worker"))
    assert env == {
        "DYNKV_KV_EVENTS_NATS_URL": plan.nats_url,
        "DYNKV_KV_EVENTS_DEPLOYMENT": "prod.eu",
        "DYNKV_KV_EVENTS_WORKER_ID": "agg-0",
    }
    assert plan.nats_url.endswith(":4333")
    assert events_subject(env["DYNKV_KV_EVENTS_DEPLOYMENT"], "agg-0") == "dynkv.prod~eu.kv.agg-0"


def test_disagg_workers_have_their_own_ids_and_no_kvbm_means_no_events():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2, 3))
    ids = {
        w.info.worker_id: events_env(w).get("DYNKV_KV_EVENTS_WORKER_ID")
        for w in plan.services
        if w.role in ("prefill", "decode")
    }
    assert ids == {"prefill-0": "prefill-0", "decode-0": "decode-0"}
    off = plan_for({"DYNKV_KVBM": "false"})
    assert events_env(off.service("worker")) == {}


def test_an_external_nats_password_reaches_the_worker_but_is_never_printed():
    import json

    plan = plan_for(
        {
            "DYNKV_INFRA": "external",
            "DYNKV_ETCD_ENDPOINTS": "http://10.0.0.1:2379",
            "DYNKV_NATS_URL": "nats://app:hunter2@10.0.0.1:4222",
        }
    )
    assert events_env(plan.service("worker"))["DYNKV_KV_EVENTS_NATS_URL"] == (
        "nats://app:hunter2@10.0.0.1:4222"
    )
    printed = json.dumps(plan.to_json())
    assert "hunter2" not in printed and "nats://app:***@10.0.0.1:4222" in printed
