"""`dynkv export compose` as a pure function: plan → compose file, validated against the vendored
compose-spec JSON schema. No Docker engine is involved."""

from __future__ import annotations

import json

from export_support import API_KEY, HF_TOKEN, IMAGE, SECRET, assert_compose_valid, options
from plan_support import host, plan_for

from dynkv.export.compose import compose_file, secret_env_files
from dynkv.export.render import escape_dollars, to_yaml
from dynkv.plan.build import build_plan
from dynkv.settings import resolve

CUDA = {"DYNKV_BLOCK_SIZE": "16"}


def services(plan, **opts):
    return compose_file(plan, options(**opts))["services"]


def test_agg_validates_and_has_infra_workers_and_frontend():
    doc = compose_file(plan_for(), options())
    assert_compose_valid(doc)
    assert doc["name"] == "dynkv-default"
    assert list(doc["services"]) == ["etcd", "nats", "worker", "frontend"]
    for svc in doc["services"].values():
        assert svc["restart"] == "on-failure"


def test_workers_and_frontend_run_the_plans_commands_in_the_dynkv_image():
    svc = services(plan_for())
    worker, frontend = svc["worker"], svc["frontend"]
    assert worker["image"] == frontend["image"] == IMAGE
    assert worker["command"][:3] == ["python3", "-m", "dynkv.worker"]
    assert frontend["command"][:3] == ["python3", "-m", "dynkv.frontend"]
    cmd = worker["command"]
    assert cmd[cmd.index("--url") + 1] == "http://worker:8100"  # its service name
    vllm = cmd[cmd.index("--") + 1 :]
    assert vllm[vllm.index("--host") + 1] == "0.0.0.0"
    assert worker["environment"]["DYNKV_WORKER_ETCD_ENDPOINTS"] == "http://etcd:2379"
    assert worker["environment"]["DYNKV_KV_EVENTS_NATS_URL"] == "nats://nats:4222"
    assert frontend["environment"]["DYNKV_FRONTEND_ETCD_ENDPOINTS"] == "http://etcd:2379"


def test_only_the_frontend_is_published_on_the_plans_address():
    svc = services(plan_for())
    assert svc["frontend"]["ports"] == ["127.0.0.1:8000:8000"]
    assert [name for name, s in svc.items() if "ports" in s] == ["frontend"]
    wide = services(plan_for({"DYNKV_FRONTEND_HOST": "0.0.0.0", "DYNKV_API_KEY": API_KEY}))
    assert wide["frontend"]["ports"] == ["0.0.0.0:8000:8000"]


def test_etcd_and_nats_use_the_image_settings_with_their_digests():
    pinned = {
        "DYNKV_ETCD_IMAGE": "quay.io/coreos/etcd:v3.6.1@sha256:" + "c" * 64,
        "DYNKV_NATS_IMAGE": "nats:2.11.4@sha256:" + "d" * 64,
    }
    dep = resolve(env={"DYNKV_STATE_DIR": "/state", **pinned}).deployment
    svc = services(plan_for(pinned), etcd_image=dep.etcd_image, nats_image=dep.nats_image)
    assert svc["etcd"]["image"] == pinned["DYNKV_ETCD_IMAGE"]
    assert svc["nats"]["image"] == pinned["DYNKV_NATS_IMAGE"]


def test_health_checks_are_the_plans_probes():
    svc = services(plan_for())
    test = svc["worker"]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python3", "-m", "dynkv.export.healthcheck"]
    probes = json.loads(test[4])
    assert [p["kind"] for p in probes] == ["http", "etcd_key"]
    assert probes[1] == {
        "kind": "etcd_key",
        "endpoints": ["http://etcd:2379"],
        "key": "/dynkv/default/workers/agg-0",
    }
    frontend = json.loads(svc["frontend"]["healthcheck"]["test"][4])
    assert frontend == [
        {
            "kind": "http",
            "url": "http://127.0.0.1:8000/health",
            "expect_status": 200,
            "expect_json": {"status": "ok"},
        }
    ]
    assert "etcdctl" in svc["etcd"]["healthcheck"]["test"]
    # the frontend starts once every worker is registered, as `up` starts it
    assert svc["frontend"]["depends_on"] == {"worker": {"condition": "service_healthy"}}


def test_two_workers_are_two_services_each_with_its_own_g3_volume():
    doc = compose_file(plan_for({"DYNKV_WORKERS": "2", "DYN_KVBM_DISK_CACHE_GB": "4"}), options())
    assert_compose_valid(doc)
    svc = doc["services"]
    assert "worker-0" in svc and "worker-1" in svc
    assert "g3-worker-0:/var/cache/dynkv/g3" in svc["worker-0"]["volumes"]
    assert "g3-worker-1:/var/cache/dynkv/g3" in svc["worker-1"]["volumes"]
    assert set(doc["volumes"]) == {"hf-cache", "g3-worker-0", "g3-worker-1"}
    pools = [svc[n]["environment"]["DYN_KVBM_DISK_CACHE_DIR"] for n in ("worker-0", "worker-1")]
    assert pools == ["/var/cache/dynkv/g3/default-agg", "/var/cache/dynkv/g3/default-agg-1"]


def test_gpu_workers_reserve_the_plans_devices():
    env = {**CUDA, "DYNKV_WORKERS": "2", "DYNKV_STATE_DIR": "/state", "DYNKV_GPUS": "4,5,6,7"}
    plan = build_plan(resolve(env=env, engine_args=["-tp", "2"]), host("cuda"))
    doc = compose_file(plan, options())
    assert_compose_valid(doc)
    devices = [
        doc["services"][n]["deploy"]["resources"]["reservations"]["devices"]
        for n in ("worker-0", "worker-1")
    ]
    assert devices == [
        [{"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["4", "5"]}],
        [{"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["6", "7"]}],
    ]
    assert "CUDA_VISIBLE_DEVICES" not in doc["services"]["worker-0"]["environment"]


def test_one_gpu_worker_without_ids_reserves_a_count():
    doc = compose_file(plan_for(CUDA, device="cuda"), options(gpus_per_role={"agg": 2}))
    assert_compose_valid(doc)
    devices = doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "capabilities": ["gpu"], "count": 2}]


def test_cpu_workers_reserve_nothing():
    assert "deploy" not in services(plan_for())["worker"]


def test_disagg_handoff_decode_workers_share_the_prefill_containers_shm():
    doc = compose_file(
        plan_for({"DYNKV_TOPOLOGY": "disagg", "DYNKV_DECODE_WORKERS": "2"}), options()
    )
    assert_compose_valid(doc)
    svc = doc["services"]
    assert svc["prefill-0"]["ipc"] == "shareable"
    assert svc["prefill-0"]["shm_size"] == "5gb"  # vLLM's 4 + the 1 GB handoff pool
    for decode in ("decode-0", "decode-1"):
        assert svc[decode]["ipc"] == "service:prefill-0"
        assert svc[decode]["depends_on"]["prefill-0"] == {"condition": "service_started"}
        assert svc[decode]["environment"]["DYN_KVBM_HANDOFF_DIR"] == "/dev/shm/dynkv-default"


def test_disagg_over_nixl_advertises_the_side_channel_by_service_name():
    env = {**CUDA, "DYNKV_TOPOLOGY": "disagg"}
    doc = compose_file(plan_for(env, device="cuda", nixl=True), options())
    assert_compose_valid(doc)
    svc = doc["services"]
    assert svc["prefill-0"]["environment"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "prefill-0"
    assert svc["decode-0"]["environment"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "decode-0"
    assert "ipc" not in svc["decode-0"]


def test_no_secret_value_in_the_compose_file():
    plan = plan_for(
        {"DYNKV_API_KEY": API_KEY, "DYNKV_WORKERS": "2"},
        secret=SECRET,
        environ={"HF_TOKEN": HF_TOKEN},
    )
    text = to_yaml([escape_dollars(compose_file(plan, options()))])
    for value in (API_KEY, SECRET, HF_TOKEN):
        assert value not in text
    svc = compose_file(plan, options())["services"]
    assert svc["frontend"]["env_file"] == ["frontend.env"]
    assert svc["worker-0"]["env_file"] == ["workers.env"]
    assert secret_env_files(plan, options()) == {
        "workers.env": ("DYNKV_DEPLOYMENT_SECRET",),
        "frontend.env": ("DYNKV_DEPLOYMENT_SECRET", "DYNKV_API_KEY"),
    }


def test_dollars_are_escaped_for_compose_interpolation():
    assert escape_dollars({"a": ["x$y", 1], "b": "${HOME}"}) == {"a": ["x$$y", 1], "b": "$${HOME}"}


def test_a_model_directory_is_bind_mounted_read_only():
    from dynkv.plan import ModelChoice

    svc = services(plan_for(model=ModelChoice("/models/tiny", "dynkv-tiny")))
    assert "/models/tiny:/models/tiny:ro" in svc["worker"]["volumes"]


def test_external_infra_is_used_as_given_and_not_run():
    env = {
        "DYNKV_INFRA": "external",
        "DYNKV_ETCD_ENDPOINTS": "http://etcd.example:2379",
        "DYNKV_NATS_URL": "nats://nats.example:4222",
    }
    doc = compose_file(plan_for(env), options())
    assert_compose_valid(doc)
    svc = doc["services"]
    assert "etcd" not in svc and "nats" not in svc
    assert "depends_on" not in svc["worker"]
    assert svc["worker"]["environment"]["DYNKV_WORKER_ETCD_ENDPOINTS"] == "http://etcd.example:2379"
    assert svc["worker"]["environment"]["DYNKV_KV_EVENTS_NATS_URL"] == "nats://nats.example:4222"


def test_external_endpoints_with_credentials_are_refused():
    import pytest

    from dynkv.export import ExportError

    env = {
        "DYNKV_INFRA": "external",
        "DYNKV_ETCD_ENDPOINTS": "http://root:hunter2@etcd.example:2379",
        "DYNKV_NATS_URL": "nats://nats.example:4222",
    }
    with pytest.raises(ExportError) as info:
        compose_file(plan_for(env), options())
    assert "hunter2" not in info.value.cause and "credentials" in info.value.cause
