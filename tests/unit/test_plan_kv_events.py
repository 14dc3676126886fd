"""Every worker is told where to publish its KV events, and its vLLM where to publish its own G1
events for the bridge (docs/kv-events.md), as data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plan_support import flag, host, plan_for, vllm_part

from dynkv.kvbm.event_settings import KvEventsSettings
from dynkv.kvbm.events import events_subject
from dynkv.plan import build_plan
from dynkv.plan.worker import IPC_PATH_MAX
from dynkv.settings import resolve
from dynkv.settings.errors import SettingsError


def events_env(worker) -> dict[str, str]:
    return {k: v for k, v in worker.env.items() if k in KvEventsSettings.env_names()}


def test_agg_worker_publishes_on_the_deployments_nats():
    plan = plan_for({"DYNKV_NAME": "prod.eu", "DYNKV_NATS_PORT": "4333"})
    env = events_env(plan.service("worker"))
    env.pop("DYNKV_KV_EVENTS_G1_ENDPOINT")
    assert env == {
        "DYNKV_KV_EVENTS_NATS_URL": plan.nats_url,
        "DYNKV_KV_EVENTS_DEPLOYMENT": "prod.eu",
        "DYNKV_KV_EVENTS_WORKER_ID": "agg-0",
    }
    assert plan.nats_url.endswith(":4333")
    assert events_subject(env["DYNKV_KV_EVENTS_DEPLOYMENT"], "agg-0") == "dynkv.prod~eu.kv.agg-0"


def test_disagg_workers_have_their_own_ids_and_endpoints():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2, 3))
    ids = {
        w.info.worker_id: events_env(w).get("DYNKV_KV_EVENTS_WORKER_ID")
        for w in plan.services
        if w.role in ("prefill", "decode")
    }
    assert ids == {"prefill-0": "prefill-0", "decode-0": "decode-0"}
    endpoints = {
        events_env(w)["DYNKV_KV_EVENTS_G1_ENDPOINT"] for w in plan.services if w.info.worker_id
    }
    assert len(endpoints) == 2


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


def g1_config(worker) -> dict:
    return json.loads(flag(vllm_part(worker.argv), "--kv-events-config"))


def test_every_vllm_publishes_its_kv_events_on_a_socket_in_the_workers_private_run_dir():
    plan = plan_for({})
    worker = plan.service("worker")
    run = Path(plan.deployment_dir) / "run" / "agg-0"
    endpoint = f"ipc://{run / 'kv-events.sock'}"
    assert g1_config(worker) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "buffer_steps": 1,
    }
    assert events_env(worker)["DYNKV_KV_EVENTS_G1_ENDPOINT"] == endpoint
    assert str(run) in worker.data_dirs  # created 0700 before start, removed by down
    assert "--g1-events-block-size" not in worker.argv  # the KVBM connector bridges them


def test_without_kvbm_the_wrapper_bridges_g1_and_publishes_for_the_router():
    plan = plan_for({"DYNKV_KVBM": "false", "DYNKV_BLOCK_SIZE": "64"})
    worker = plan.service("worker")
    env = events_env(worker)
    assert env["DYNKV_KV_EVENTS_NATS_URL"] == plan.nats_url
    assert env["DYNKV_KV_EVENTS_WORKER_ID"] == "agg-0"
    assert g1_config(worker)["endpoint"] == env["DYNKV_KV_EVENTS_G1_ENDPOINT"]
    wrapper = list(worker.argv)[: list(worker.argv).index("--")]
    assert flag(wrapper, "--g1-events-block-size") == "64"
    assert "--kv-transfer-config" not in worker.argv


def test_a_socket_path_too_long_for_unix_is_relative_to_the_workers_cwd(tmp_path):
    deep = tmp_path / ("d" * 80)
    plan = plan_for({}, tmp=deep)
    worker = plan.service("worker")
    endpoint = g1_config(worker)["endpoint"]
    assert endpoint == "ipc://run/agg-0/kv-events.sock"
    assert worker.cwd == plan.deployment_dir
    assert len(str(Path(plan.deployment_dir) / endpoint[6:])) > IPC_PATH_MAX


def test_data_parallel_engines_get_no_g1_events_and_a_note():
    env = {"DYNKV_STATE_DIR": "/state"}
    plan = build_plan(resolve(env=env, engine_args=["--data-parallel-size", "2"]), host())
    worker = plan.service("worker")
    assert "--kv-events-config" not in worker.argv
    assert "DYNKV_KV_EVENTS_G1_ENDPOINT" not in worker.env
    assert any("no G1 KV events" in n for n in plan.notes)


def test_a_users_own_kv_events_config_is_refused():
    env = {"DYNKV_STATE_DIR": "/state"}
    with pytest.raises(SettingsError) as info:
        build_plan(resolve(env=env, engine_args=["--kv-events-config", "{}"]), host())
    assert "--kv-events-config" in info.value.cause and "KV events" in info.value.fix
