"""`dynkv export kubernetes` as a pure function: plan → manifests, validated against the
Kubernetes schemas (kubernetes-validate, offline). Plans for CUDA hosts are built on this CPU box
(tests/plan_support.py); no cluster is involved."""

from __future__ import annotations

import json

import pytest
from export_support import (
    API_KEY,
    HF_TOKEN,
    IMAGE,
    SECRET,
    assert_k8s_valid,
    by_kind,
    containers,
    env_of,
    options,
)
from plan_support import host, plan_for

from dynkv.export import ExportError, G3Volume, parse_g3_volume
from dynkv.export.kubernetes import manifests, secret_manifest, secret_names
from dynkv.export.render import to_yaml
from dynkv.plan.build import build_plan
from dynkv.settings import resolve

CUDA = {"DYNKV_BLOCK_SIZE": "16"}
MODEL = {"DYNKV_MODEL": "Qwen/Qwen3-0.6B"}


def deployments(docs):
    return by_kind(docs, "Deployment")


def test_agg_has_every_object_and_validates():
    docs = manifests(plan_for(), options())
    assert_k8s_valid(docs)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", "dynkv-default-settings"),
        ("Deployment", "dynkv-default-frontend"),
        ("Deployment", "dynkv-default-worker"),
        ("Service", "dynkv-default-etcd"),
        ("Service", "dynkv-default-frontend"),
        ("Service", "dynkv-default-nats"),
        ("StatefulSet", "dynkv-default-etcd"),
        ("StatefulSet", "dynkv-default-nats"),
    ]
    for name in ("dynkv-default-etcd", "dynkv-default-nats"):
        assert by_kind(docs, "Service")[name]["spec"]["clusterIP"] == "None"  # headless


def test_frontend_and_workers_run_the_plans_commands_in_one_image():
    docs = manifests(plan_for(), options())
    worker = containers(deployments(docs)["dynkv-default-worker"])[0]
    frontend = containers(deployments(docs)["dynkv-default-frontend"])[0]
    assert worker["image"] == frontend["image"] == IMAGE
    assert worker["args"][:3] == ["python3", "-m", "dynkv.worker"]
    assert frontend["args"][:3] == ["python3", "-m", "dynkv.frontend"]
    vllm = worker["args"][worker["args"].index("--") + 1 :]
    assert vllm[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    # inside a pod: bind every address, register the pod's IP under the pod's name
    assert vllm[vllm.index("--host") + 1] == "0.0.0.0"
    assert frontend["args"][frontend["args"].index("--host") + 1] == "0.0.0.0"
    args = worker["args"]
    assert args[args.index("--url") + 1] == "http://$(POD_IP):8100"
    assert args[args.index("--worker-id") + 1] == "$(POD_NAME)"
    assert list(env_of(worker))[:2] == ["POD_NAME", "POD_IP"]  # defined before they are used


def test_nothing_host_local_reaches_a_pod():
    plan = plan_for(environ={"PYTHONPATH": "/home/me/src", "HF_HOME": "/home/me/hf"})
    text = to_yaml(manifests(plan, options()))
    for local in ("127.0.0.1:2379", "127.0.0.1:4222", "/state/", "/home/me", "/venv/bin"):
        assert local not in text, local
    assert "VLLM_CPU_OMP_THREADS_BIND" not in text  # this host's cores
    fleet = to_yaml(manifests(plan_for({"DYNKV_WORKERS": "2"}, cpus=(0, 1)), options()))
    assert "--cpus" not in fleet and "VLLM_CPU_OMP_THREADS_BIND" not in fleet


def test_etcd_and_nats_are_the_configured_images_reached_by_service_name():
    settings = {
        "DYNKV_ETCD_IMAGE": "quay.io/coreos/etcd:v3.6.1@sha256:" + "a" * 64,
        "DYNKV_NATS_IMAGE": "nats:2.11.4@sha256:" + "b" * 64,
    }
    resolved = resolve(env={"DYNKV_STATE_DIR": "/state", **settings})
    plan = build_plan(resolved, host())
    opts = options(
        etcd_image=resolved.deployment.etcd_image, nats_image=resolved.deployment.nats_image
    )
    docs = manifests(plan, opts)
    sets = by_kind(docs, "StatefulSet")
    assert containers(sets["dynkv-default-etcd"])[0]["image"] == settings["DYNKV_ETCD_IMAGE"]
    assert containers(sets["dynkv-default-nats"])[0]["image"] == settings["DYNKV_NATS_IMAGE"]
    config = by_kind(docs, "ConfigMap")["dynkv-default-settings"]["data"]
    assert config["DYNKV_WORKER_ETCD_ENDPOINTS"] == "http://dynkv-default-etcd:2379"
    assert config["DYNKV_KV_EVENTS_NATS_URL"] == "nats://dynkv-default-nats:4222"


def test_readiness_probes_are_the_plans():
    docs = manifests(plan_for(), options())
    sets = by_kind(docs, "StatefulSet")
    etcd = containers(sets["dynkv-default-etcd"])[0]["readinessProbe"]["httpGet"]
    nats = containers(sets["dynkv-default-nats"])[0]["readinessProbe"]["httpGet"]
    assert (etcd["path"], etcd["port"]) == ("/health", 2379)
    assert (nats["path"], nats["port"]) == ("/healthz", 8222)
    worker = containers(deployments(docs)["dynkv-default-worker"])[0]
    command = worker["readinessProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-m", "dynkv.export.healthcheck"]
    probes = json.loads(command[3])
    assert probes[0] == {
        "kind": "http",
        "url": "http://127.0.0.1:8100/health",
        "expect_status": 200,
    }
    assert probes[1]["key"] == "/dynkv/default/workers/${POD_NAME}"  # expanded in the pod
    frontend = containers(deployments(docs)["dynkv-default-frontend"])[0]["readinessProbe"]
    assert "dynkv.export.healthcheck" in frontend["exec"]["command"]  # it reads the JSON body


def test_two_agg_workers_are_one_deployment_of_two_replicas():
    docs = manifests(plan_for({"DYNKV_WORKERS": "2"}), options())
    assert_k8s_valid(docs)
    worker = deployments(docs)["dynkv-default-worker"]
    assert worker["spec"]["replicas"] == 2
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    assert len(containers(worker)) == 1


def test_gpu_workers_request_their_tensor_parallel_size():
    env = {**CUDA, "DYNKV_WORKERS": "2", "DYNKV_STATE_DIR": "/state"}
    plan = build_plan(resolve(env=env, engine_args=["-tp", "2"]), host("cuda"))
    docs = manifests(plan, options(gpus_per_role={"agg": 2}))
    assert_k8s_valid(docs)
    worker = containers(deployments(docs)["dynkv-default-worker"])[0]
    assert worker["resources"] == {
        "requests": {"nvidia.com/gpu": 2},
        "limits": {"nvidia.com/gpu": 2},
    }
    assert "CUDA_VISIBLE_DEVICES" not in to_yaml(docs)  # the device plugin chooses


def test_one_gpu_worker_without_gpu_ids_takes_the_roles_count():
    docs = manifests(plan_for(CUDA, device="cuda"), options(gpus_per_role={"agg": 4}))
    worker = containers(deployments(docs)["dynkv-default-worker"])[0]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 4}


def test_cpu_workers_request_no_gpu():
    worker = containers(deployments(manifests(plan_for(), options()))["dynkv-default-worker"])[0]
    assert "resources" not in worker


def test_disagg_over_nixl_is_one_deployment_per_role():
    env = {**CUDA, "DYNKV_TOPOLOGY": "disagg", "DYNKV_DECODE_WORKERS": "2"}
    docs = manifests(plan_for(env, device="cuda", nixl=True), options())
    assert_k8s_valid(docs)
    deps = deployments(docs)
    assert deps["dynkv-default-prefill"]["spec"]["replicas"] == 1
    assert deps["dynkv-default-decode"]["spec"]["replicas"] == 2
    prefill = containers(deps["dynkv-default-prefill"])[0]
    assert env_of(prefill)["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "$(POD_IP)"
    assert {"name": "nixl", "containerPort": 5600} in prefill["ports"]
    frontend = containers(deps["dynkv-default-frontend"])[0]["args"]
    assert frontend[frontend.index("--disagg-transfer") + 1] == "nixl"


def test_disagg_over_the_handoff_is_one_pod_sharing_dev_shm():
    env = {"DYNKV_TOPOLOGY": "disagg", "DYNKV_DECODE_WORKERS": "2"}
    docs = manifests(plan_for(env), options())
    assert_k8s_valid(docs)
    pod = deployments(docs)["dynkv-default-disagg"]
    assert pod["spec"]["replicas"] == 1
    names = [c["name"] for c in containers(pod)]
    assert names == ["prefill-0", "decode-0", "decode-1"]
    volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory"}
    shared = by_kind(docs, "ConfigMap")["dynkv-default-settings"]["data"]
    assert shared["DYN_KVBM_HANDOFF_DIR"] == "/dev/shm/dynkv-default"  # every container's
    for c in containers(pod):
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        # fixed containers keep the plan's ids; they share the pod's network, so its ports
        assert c["args"][c["args"].index("--worker-id") + 1] == c["name"]
    ports = [c["args"][c["args"].index("--url") + 1] for c in containers(pod)]
    assert ports == [f"http://$(POD_IP):{p}" for p in (8100, 8101, 8102)]


@pytest.mark.parametrize(
    ("volume", "source"),
    [
        (G3Volume(), {"emptyDir": {}}),
        (G3Volume("pvc", "g3"), {"persistentVolumeClaim": {"claimName": "g3"}}),
        (
            G3Volume("hostPath", "/mnt/g3"),
            {"hostPath": {"path": "/mnt/g3", "type": "DirectoryOrCreate"}},
        ),
    ],
)
def test_g3_lives_on_the_volume_the_user_chose(volume, source):
    env = {"DYN_KVBM_DISK_CACHE_GB": "4", "DYNKV_WORKERS": "2"}
    docs = manifests(plan_for(env), options(g3_volume=volume))
    assert_k8s_valid(docs)
    worker = deployments(docs)["dynkv-default-worker"]
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert {k: v for k, v in volumes["g3-worker-0"].items() if k != "name"} == source
    container = containers(worker)[0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "g3-worker-0")
    assert mount["mountPath"] == "/var/cache/dynkv/g3"
    if volume.kind != "emptyDir":  # replicas: each pod its own pool
        assert mount["subPathExpr"] == "$(POD_NAME)/worker-0"
    assert env_of(container)["DYN_KVBM_DISK_CACHE_DIR"] == "/var/cache/dynkv/g3/default-agg"


def test_one_replica_keeps_its_pool_across_pods():
    env = {"DYN_KVBM_DISK_CACHE_GB": "4"}
    docs = manifests(plan_for(env), options(g3_volume=G3Volume("pvc", "g3")))
    container = containers(deployments(docs)["dynkv-default-worker"])[0]
    mount = next(m for m in container["volumeMounts"] if m["name"].startswith("g3-"))
    assert mount["subPath"] == "worker"


def test_no_g3_volume_without_a_disk_tier():
    plan = plan_for({"DYN_KVBM_DISK_CACHE_GB": "0"})
    worker = containers(deployments(manifests(plan, options()))["dynkv-default-worker"])[0]
    assert not [m for m in worker["volumeMounts"] if m["name"].startswith("g3-")]


@pytest.mark.parametrize(
    ("text", "volume"),
    [
        ("emptyDir", G3Volume()),
        ("pvc:kv-pool", G3Volume("pvc", "kv-pool")),
        ("hostPath:/mnt/nvme", G3Volume("hostPath", "/mnt/nvme")),
    ],
)
def test_g3_volume_option(text, volume):
    assert parse_g3_volume(text) == volume


@pytest.mark.parametrize(
    "text", ["", "tmpfs", "pvc:", "pvc:Bad_Name", "hostPath:rel", "emptyDir:x"]
)
def test_a_bad_g3_volume_is_refused_with_a_fix(text):
    with pytest.raises(ExportError) as info:
        parse_g3_volume(text)
    assert "pvc:NAME" in info.value.fix


def test_the_settings_configmap_holds_the_shared_environment_and_the_profile():
    env = {"DYNKV_TOPOLOGY": "disagg"}
    docs = manifests(plan_for(env), options(profile_text="[kvbm]\ncpu_cache_gb = 4\n"))
    maps = by_kind(docs, "ConfigMap")
    assert maps["dynkv-default-profile"]["data"]["profile.toml"].startswith("[kvbm]")
    shared = maps["dynkv-default-settings"]["data"]
    assert "DYN_KVBM_CPU_CACHE_GB" not in shared  # prefill 4, decode 0: per container
    assert shared["DYN_KVBM_HANDOFF_DIR"] == "/dev/shm/dynkv-default"
    for c in containers(deployments(docs)["dynkv-default-disagg"]):
        assert c["envFrom"] == [{"configMapRef": {"name": "dynkv-default-settings"}}]


def test_no_secret_value_in_any_manifest():
    plan = plan_for(
        {"DYNKV_API_KEY": API_KEY, "DYNKV_WORKERS": "2"},
        secret=SECRET,
        environ={"HF_TOKEN": HF_TOKEN},
    )
    assert API_KEY in json.dumps(plan.to_json(mask=False))  # the plan has them …
    text = to_yaml(manifests(plan, options()))
    for value in (API_KEY, SECRET, HF_TOKEN):  # … the manifests do not
        assert value not in text
    frontend = containers(deployments(manifests(plan, options()))["dynkv-default-frontend"])[0]
    refs = {
        k: v["secretKeyRef"]
        for k, v in env_of(frontend).items()
        if isinstance(v, dict) and "secretKeyRef" in v
    }
    assert refs["DYNKV_API_KEY"] == {"name": "dynkv-default-keys", "key": "DYNKV_API_KEY"}
    assert refs["DYNKV_DEPLOYMENT_SECRET"]["key"] == "DYNKV_DEPLOYMENT_SECRET"
    assert refs["HF_TOKEN"]["optional"] is True
    worker = containers(deployments(manifests(plan, options()))["dynkv-default-worker"])[0]
    assert "DYNKV_API_KEY" not in env_of(worker)  # the frontend's key only


def test_the_secret_carries_what_the_containers_reference():
    plan = plan_for()
    names = secret_names(plan, options())
    assert names == ("DYNKV_DEPLOYMENT_SECRET", "DYNKV_API_KEY")
    secret = secret_manifest(plan, dict.fromkeys(names, "generated"))
    assert_k8s_valid([secret])
    assert secret["metadata"]["name"] == "dynkv-default-keys"


def test_insecure_frontend_needs_no_api_key():
    plan = plan_for({"DYNKV_INSECURE": "true"})
    assert secret_names(plan, options()) == ("DYNKV_DEPLOYMENT_SECRET",)
    frontend = containers(deployments(manifests(plan, options()))["dynkv-default-frontend"])[0]
    assert "--insecure" in frontend["args"]


def test_a_model_directory_is_mounted_read_only_from_the_node(tmp_path):
    from dynkv.plan import ModelChoice

    plan = plan_for(model=ModelChoice("/models/tiny", "dynkv-tiny"))
    worker = deployments(manifests(plan, options()))["dynkv-default-worker"]
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["hostPath"]["path"] == "/models/tiny"
    mount = next(m for m in containers(worker)[0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models/tiny", "readOnly": True}


def test_a_long_name_is_refused():
    with pytest.raises(ExportError):
        manifests(plan_for({"DYNKV_NAME": "n" * 60}), options())


def test_hf_id_models_need_no_volume():
    plan = plan_for(MODEL)
    from dynkv.plan import ModelChoice

    plan = plan_for(model=ModelChoice("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"))
    worker = deployments(manifests(plan, options()))["dynkv-default-worker"]
    assert "model" not in {v["name"] for v in worker["spec"]["template"]["spec"]["volumes"]}
