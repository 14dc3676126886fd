"""A fleet on one host (docs/fleet.md): N workers per role, each with its own name, ports, G3
pool, log, registration, cores or GPUs; and the errors for counts and GPU sets that cannot work."""

from __future__ import annotations

import json

import pytest
from doctor_support import base_env, cuda_build, gpus, run
from plan_support import flag, plan_for, vllm_part
from typer.testing import CliRunner

from dynkv.cli.main import app
from dynkv.doctor import Status
from dynkv.doctor.check_fleet import cores
from dynkv.doctor.context import DoctorContext
from dynkv.kvbm.handoff import pool_dir
from dynkv.plan.build import PlanError
from dynkv.plan.cpu import split_cores
from dynkv.settings import resolve
from dynkv.settings.errors import SettingsError

WORKER_ROLES = ("agg", "prefill", "decode")


def workers(plan):
    return [s for s in plan.services if s.role in WORKER_ROLES]


# ---- names, ports, pools, logs, registrations ----------------------------------------------------


def test_two_agg_workers_each_have_their_own_everything():
    plan = plan_for({"DYNKV_WORKERS": "2", "DYN_KVBM_DISK_CACHE_DIR": "/g3"})
    w0, w1 = workers(plan)
    assert (w0.name, w1.name) == ("worker-0", "worker-1")
    assert (w0.info.worker_id, w1.info.worker_id) == ("agg-0", "agg-1")
    assert w0.info.etcd_key == "/dynkv/default/workers/agg-0"
    assert w1.info.etcd_key == "/dynkv/default/workers/agg-1"
    assert (w0.ports, w1.ports) == (
        {"http": 8100, "kvbm_metrics": 6880},
        {"http": 8101, "kvbm_metrics": 6881},
    )
    assert flag(vllm_part(w1.argv), "--port") == "8101"
    assert w1.env["DYN_KVBM_METRICS_PORT"] == "6881"
    # the first keeps the pool it had as the only worker; the others get their own
    assert w0.env["DYN_KVBM_DISK_CACHE_DIR"] == "/g3/default-agg"
    assert w1.env["DYN_KVBM_DISK_CACHE_DIR"] == "/g3/default-agg-1"
    assert w0.log_file.endswith("/logs/worker-0.log") and w1.log_file.endswith("/worker-1.log")
    assert plan.service("frontend").depends_on == ("worker-0", "worker-1")


def test_one_agg_worker_keeps_its_name():
    assert [w.name for w in workers(plan_for())] == ["worker"]
    assert workers(plan_for({"DYNKV_WORKERS": "1"}))[0].info.worker_id == "agg-0"


def test_disagg_counts_index_within_the_role_and_ports_across_the_fleet():
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg", "DYNKV_DECODE_WORKERS": "2"})
    names = [w.name for w in workers(plan)]
    assert names == ["prefill-0", "decode-0", "decode-1"]
    assert [w.ports["http"] for w in workers(plan)] == [8100, 8101, 8102]
    handoff = {w.env["DYN_KVBM_HANDOFF_DIR"] for w in workers(plan)}
    assert handoff == {"/dev/shm/dynkv-default"}  # the deployment's handoff area
    assert workers(plan)[0].env["DYN_KVBM_HANDOFF_POOL"] == "prefill-0"  # the pool it writes
    for decode in workers(plan)[1:]:
        assert decode.env["DYN_KVBM_CPU_CACHE_GB"] == "0"  # decode workers stay tierless
        assert decode.env["DYN_KVBM_HANDOFF_POOLS"] == "prefill-0"  # the pools it reads
        assert "DYN_KVBM_HANDOFF_POOL" not in decode.env


def test_two_prefill_workers_each_write_a_pool_of_their_own():
    plan = plan_for(
        {"DYNKV_TOPOLOGY": "disagg", "DYNKV_PREFILL_WORKERS": "2", "DYNKV_DECODE_WORKERS": "2"},
        cpus=(0, 1, 2, 3),
    )
    p0, p1, d0, d1 = workers(plan)
    assert [w.name for w in (p0, p1, d0, d1)] == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    assert [w.info.worker_id for w in (p0, p1)] == ["prefill-0", "prefill-1"]
    assert [w.ports["http"] for w in (p0, p1, d0, d1)] == [8100, 8101, 8102, 8103]
    area = {w.env["DYN_KVBM_HANDOFF_DIR"] for w in (p0, p1, d0, d1)}
    assert area == {"/dev/shm/dynkv-default"}
    # disjoint pools, one writer each, named by the worker: /dev/shm/dynkv-default/prefill-i
    pools = [pool_dir("/dev/shm/dynkv-default", w.env["DYN_KVBM_HANDOFF_POOL"]) for w in (p0, p1)]
    assert [str(p) for p in pools] == [
        "/dev/shm/dynkv-default/prefill-0",
        "/dev/shm/dynkv-default/prefill-1",
    ]
    for prefill in (p0, p1):
        assert "DYN_KVBM_HANDOFF_POOLS" not in prefill.env  # a writer reads no other pool
        assert "DYN_KVBM_HANDOFF_POOLS" in prefill.env_unset  # not even an inherited list
        assert "/dev/shm/dynkv-default" in prefill.data_dirs  # `down` removes the area
        assert prefill.env["DYN_KVBM_CPU_CACHE_GB"] != "0"  # both keep the profile's tiers
    for decode in (d0, d1):
        assert decode.env["DYN_KVBM_HANDOFF_POOLS"] == "prefill-0,prefill-1"
        assert "DYN_KVBM_HANDOFF_POOL" not in decode.env and "DYN_KVBM_HANDOFF_POOL" in (
            decode.env_unset
        )
        assert not any(d.startswith("/dev/shm") for d in decode.data_dirs)  # only its run dir
    # the G3 pools, ports and bind lists stay per worker too
    assert p0.env["DYN_KVBM_DISK_CACHE_DIR"] != p1.env["DYN_KVBM_DISK_CACHE_DIR"]
    binds = [w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in (p0, p1, d0, d1)]
    assert binds == ["0", "1", "2", "3"]
    # the frontend picks among both prefill workers like among the decode workers
    assert plan.service("frontend").depends_on == ("prefill-0", "prefill-1", "decode-0", "decode-1")


def test_a_handoff_pool_variable_of_the_launcher_never_reaches_the_other_role():
    env = {
        "DYNKV_TOPOLOGY": "disagg",
        "DYN_KVBM_HANDOFF_POOL": "mine",
        "DYN_KVBM_HANDOFF_POOLS": "a,b",
    }
    prefill, decode = workers(plan_for(env))
    assert prefill.env["DYN_KVBM_HANDOFF_POOL"] == "prefill-0"
    assert "DYN_KVBM_HANDOFF_POOLS" not in prefill.env
    assert decode.env["DYN_KVBM_HANDOFF_POOLS"] == "prefill-0"
    assert "DYN_KVBM_HANDOFF_POOL" not in decode.env


def test_prometheus_scrapes_every_worker(tmp_path):
    plan = plan_for(
        {"DYNKV_WORKERS": "3", "DYNKV_OBSERVABILITY": "true"},
        cpus=(0, 1, 2),
        prometheus_binary="/bin/prometheus",
    )
    config = next(iter(plan.service("prometheus").files.values()))
    for worker, port in (("agg-0", 6880), ("agg-1", 6881), ("agg-2", 6882)):
        assert f'- targets: ["127.0.0.1:{port}"]\n        labels: {{worker: "{worker}"}}' in config


def test_counts_come_from_flags_env_and_profile(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("[kvbm]\ncpu_cache_gb = 1\n[deployment]\nworkers = 3\n")
    resolved = resolve(profile=str(profile), env={})
    assert resolved.deployment.workers == 3
    assert resolved.settings["DYNKV_WORKERS"].source == "profile"
    assert resolve(profile=str(profile), env={"DYNKV_WORKERS": "2"}).deployment.workers == 2
    flags = {"workers": 4}
    assert resolve(profile=str(profile), env={}, deployment_flags=flags).deployment.workers == 4


# ---- cores --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "n", "lists"),
    [
        ((0, 1), 2, [(0,), (1,)]),
        ((0, 1, 2, 3), 2, [(0, 1), (2, 3)]),
        ((0, 1, 2, 3, 4), 2, [(0, 1), (2, 3, 4)]),  # a later worker takes the spare core
        ((0, 1, 2, 3, 4, 5, 6), 3, [(0, 1), (2, 3), (4, 5, 6)]),
        ((0, 1), 3, [(0,), (1,), (0,)]),  # more workers than cores: shared (doctor warns)
        ((4, 5, 8), 1, [(4, 5, 8)]),
    ],
)
def test_split_cores(cpus, n, lists):
    assert split_cores(cpus, n) == lists


def test_cpu_workers_get_disjoint_bind_lists_and_their_own_g1():
    plan = plan_for({"DYNKV_WORKERS": "2"}, cpus=(0, 1, 2, 3), environ={})
    binds = [w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in workers(plan)]
    assert binds == ["0-1", "2-3"]
    for w in workers(plan):
        assert w.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
        assert w.env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # G1 per worker (dynkv's CPU default)


def wrapper_part(argv) -> list[str]:
    argv = list(argv)
    return argv[: argv.index("--")]


def test_cpu_workers_run_all_of_vllm_on_their_own_cores():
    """vLLM binds only its model runner's threads: the wrapper pins the API server and the
    EngineCore to the same cores, so that one engine's front processes do not run on a
    neighbour's core (docs/fleet.md#cpu-engines)."""
    plan = plan_for({"DYNKV_WORKERS": "2"}, cpus=(0, 1, 2, 3), environ={})
    assert [flag(wrapper_part(w.argv), "--cpus") for w in workers(plan)] == ["0-1", "2-3"]
    disagg = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpus=(0, 1, 2))
    assert [flag(wrapper_part(w.argv), "--cpus") for w in workers(disagg)] == ["0", "1-2"]


def test_one_engine_or_gpus_leave_vllm_where_the_scheduler_puts_it():
    alone = workers(plan_for(cpus=(0, 1), environ={}))[0]
    assert "--cpus" not in wrapper_part(alone.argv)  # its front processes may use any core
    on_gpus = workers(plan_for({"DYNKV_WORKERS": "2"}, device="cuda"))
    assert all("--cpus" not in w.argv for w in on_gpus)


def test_a_user_binding_serves_one_engine_only():
    environ = {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    one = workers(plan_for(environ=environ))[0]
    assert one.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    two = workers(plan_for({"DYNKV_WORKERS": "2"}, environ=environ))
    assert [w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in two] == ["0", "1"]


# ---- GPUs ---------------------------------------------------------------------------------------


def cvd(plan):
    return [w.env.get("CUDA_VISIBLE_DEVICES") for w in workers(plan)]


def test_each_cuda_worker_gets_tensor_parallel_size_gpus():
    env = {"DYNKV_WORKERS": "2", "DYNKV_BLOCK_SIZE": "16"}
    assert cvd(plan_for(env, device="cuda")) == ["0", "1"]
    plan = plan_for(env, device="cuda", tmp=None)
    assert "--tensor-parallel-size" not in vllm_part(workers(plan)[0].argv)


def test_tensor_parallel_from_the_engine_arguments(tmp_path):
    from plan_support import host

    from dynkv.plan.build import build_plan
    from dynkv.settings.resolve import resolve as _resolve

    env = {"DYNKV_STATE_DIR": str(tmp_path), "DYNKV_WORKERS": "2", "DYNKV_BLOCK_SIZE": "16"}
    for words in (["--tensor-parallel-size", "2"], ["-tp", "2"], ["--tensor-parallel-size=2"]):
        plan = build_plan(_resolve(env=env, engine_args=words), host("cuda"))
        assert cvd(plan) == ["0,1", "2,3"], words
    gpus_set = {**env, "DYNKV_GPUS": "4,5,6,7"}
    plan = build_plan(_resolve(env=gpus_set, engine_args=["-tp", "2"]), host("cuda"))
    assert cvd(plan) == ["4,5", "6,7"]


def test_one_worker_leaves_cuda_visible_devices_alone_unless_gpus_is_given():
    assert cvd(plan_for({"DYNKV_BLOCK_SIZE": "16"}, device="cuda")) == [None]
    assert cvd(plan_for({"DYNKV_BLOCK_SIZE": "16", "DYNKV_GPUS": "3"}, device="cuda")) == ["3"]


def test_the_launchers_cuda_visible_devices_is_the_default_set():
    env = {"DYNKV_TOPOLOGY": "disagg", "DYNKV_BLOCK_SIZE": "16"}
    plan = plan_for(env, device="cuda", environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert cvd(plan) == ["2", "3"]


# ---- errors: exit 2, one cause and one fix ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "words", "cause", "fix"),
    [
        ({"DYNKV_WORKERS": "2", "DYNKV_GPUS": "0,1,2"}, ["-tp", "2"], "need 4 GPUs", "--gpus"),
        ({"DYNKV_WORKERS": "2", "DYNKV_GPUS": "0,0"}, [], "twice", "list each GPU once"),
        ({"DYNKV_WORKERS": "2"}, ["-tp", "two"], "whole number of GPUs", "-tp 2"),
    ],
)
def test_gpu_sets_that_cannot_work(tmp_path, env, words, cause, fix):
    from plan_support import host

    from dynkv.plan.build import build_plan

    env = {"DYNKV_STATE_DIR": str(tmp_path), "DYNKV_BLOCK_SIZE": "16", **env}
    with pytest.raises(PlanError) as exc:
        build_plan(resolve(env=env, engine_args=words), host("cuda"))
    assert cause in exc.value.cause and fix in exc.value.fix


def test_counts_for_the_other_topology_are_refused():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_TOPOLOGY": "disagg", "DYNKV_WORKERS": "2"})
    assert "DYNKV_WORKERS = 2" in exc.value.cause and "--prefill-workers" in exc.value.fix
    with pytest.raises(PlanError) as exc:
        plan_for(flags={"decode_workers": 2})
    assert "--decode-workers = 2" in exc.value.cause and "--topology disagg" in exc.value.fix
    plan_for({"DYNKV_TOPOLOGY": "disagg", "DYNKV_WORKERS": "1"})  # 1 is harmless


def test_several_prefill_workers_take_either_transfer():
    for transfer, device in (("handoff", "cpu"), ("nixl", "cuda")):
        env = {"DYNKV_TOPOLOGY": "disagg", "DYNKV_PREFILL_WORKERS": "3"}
        env |= {"DYNKV_DISAGG_TRANSFER": transfer, "DYNKV_BLOCK_SIZE": "32"}
        plan = plan_for(env, device=device, nixl=True, cpus=(0, 1, 2, 3))
        names = [w.name for w in workers(plan)]
        assert names == ["prefill-0", "prefill-1", "prefill-2", "decode-0"]


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_bad_counts_are_settings_errors(value):
    with pytest.raises(SettingsError) as exc:
        resolve(env={"DYNKV_WORKERS": value})
    assert "DYNKV_WORKERS" in str(exc.value)


def test_no_worker_only_for_a_first_host_others_join():
    with pytest.raises(PlanError) as exc:
        plan_for({"DYNKV_WORKERS": "0"})
    assert "--advertise" in exc.value.fix
    plan = plan_for({"DYNKV_WORKERS": "0", "DYNKV_ADVERTISE": "127.0.0.1"}, secret="s" * 64)
    assert plan.workers == ()
    assert [s.name for s in plan.services] == ["etcd", "nats", "enroll", "frontend"]
    frontend = plan.service("frontend")
    assert frontend.depends_on == ("etcd", "nats")
    assert [p.kind for p in frontend.probes] == ["tcp"]  # /health says "starting" until one joins


@pytest.mark.parametrize(
    "args",
    [
        ["--workers", "0"],
        ["--topology", "disagg", "--workers", "2"],
        ["--gpus", "0,,1"],
        ["--prefill-workers", "2"],
    ],
)
def test_cli_errors_exit_2_with_a_fix(clean_env, tmp_path, args):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["up", "--dry-run", "--json", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert not (tmp_path / "default").exists()  # nothing half-started


def test_cli_dry_run_of_a_fleet(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    args = ["up", "--dry-run", "--json", "--device", "cpu", "--model", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--topology", "disagg", "--decode-workers", "2"])
    assert result.exit_code == 0, result.output
    names = [s["name"] for s in json.loads(result.stdout)["services"]]
    assert names == ["etcd", "nats", "prefill-0", "decode-0", "decode-1", "frontend"]


def test_cli_dry_run_of_two_prefill_and_two_decode_workers(clean_env, tmp_path):
    clean_env.setenv("DYNKV_STATE_DIR", str(tmp_path))
    args = ["up", "--dry-run", "--device", "cpu", "--model", str(tmp_path), "--topology", "disagg"]
    args += ["--prefill-workers", "2", "--decode-workers", "2"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    services = {s["name"]: s for s in json.loads(result.stdout)["services"]}
    assert list(services) == [
        "etcd", "nats", "prefill-0", "prefill-1", "decode-0", "decode-1", "frontend"
    ]  # fmt: skip
    assert services["prefill-1"]["env"]["DYN_KVBM_HANDOFF_POOL"] == "prefill-1"
    assert services["decode-1"]["env"]["DYN_KVBM_HANDOFF_POOLS"] == "prefill-0,prefill-1"
    text = CliRunner().invoke(app, args)  # the human-readable plan (stderr) shows them too
    assert text.exit_code == 0, text.output
    for shown in (
        "prefill-1 prefill",
        "DYN_KVBM_HANDOFF_POOL=prefill-1",
        "POOLS=prefill-0,prefill-1",
    ):
        assert shown in text.output


# ---- doctor -------------------------------------------------------------------------------------


def fleet_ctx(tmp_path, cpu_ids, **env):
    resolved = resolve(env={**base_env(tmp_path), "DYNKV_DEVICE": "cpu", **env})
    return DoctorContext(resolved, env={}, cpu_ids=cpu_ids, import_vllm=False)


def test_doctor_warns_when_workers_outnumber_cores(tmp_path):
    outcome = cores(fleet_ctx(tmp_path, (0, 1), DYNKV_WORKERS="3"))
    assert outcome.status is Status.WARN and "--workers 2" in outcome.fix
    outcome = cores(fleet_ctx(tmp_path, (0, 1, 2, 3), DYNKV_WORKERS="2"))
    assert outcome.status is Status.OK and "0-1, 2-3" in outcome.detail


def test_doctor_gpu_count_is_workers_times_tensor_parallel(tmp_path):
    env = base_env(tmp_path, DYNKV_WORKERS="2", DYNKV_BLOCK_SIZE="16")
    assert run(env, nvml=gpus(2), build=cuda_build())["gpu.count"].status is Status.OK
    assert run(env, nvml=gpus(1), build=cuda_build())["gpu.count"].status is Status.FAIL
    profile = tmp_path / "tp.toml"
    profile.write_text("[kvbm]\ncpu_cache_gb = 1\n[vllm]\ntensor_parallel_size = 2\n")
    check = run(env, nvml=gpus(3), build=cuda_build(), profile=str(profile))["gpu.count"]
    assert check.status is Status.FAIL
    assert "2 agg workers × 2 GPUs need 4 GPUs" in check.detail and "--workers" in check.fix
    four = run(env, nvml=gpus(4), build=cuda_build(), profile=str(profile))["gpu.count"]
    assert four.status is Status.OK


def test_doctor_checks_the_gpus_listed(tmp_path):
    env = base_env(tmp_path, DYNKV_WORKERS="2", DYNKV_BLOCK_SIZE="16", DYNKV_GPUS="2,7")
    check = run(env, nvml=gpus(4), build=cuda_build())["gpu.count"]
    assert check.status is Status.FAIL and "GPU 7" in check.detail and "0–3" in check.fix
    env["DYNKV_GPUS"] = "2,3"
    assert run(env, nvml=gpus(4), build=cuda_build())["gpu.count"].status is Status.OK


def test_doctor_memory_counts_g2_per_worker_and_g1_on_cpu(tmp_path):
    env = base_env(tmp_path, DYNKV_WORKERS="3", DYNKV_DEVICE="cpu")
    detail = run(env)["memory.ram"].detail
    # 3 × (G2 1 GB + G1 0.5 GB)
    assert "needs 4.5 GB" in detail and "× 3 workers" in detail
    env = base_env(tmp_path, DYNKV_TOPOLOGY="disagg", DYNKV_DECODE_WORKERS="2", DYNKV_DEVICE="cpu")
    detail = run(env)["memory.ram"].detail
    # G2 on the prefill worker only + 3 × G1 0.5 GB
    assert "needs 2.5 GB" in detail and "G2 1.0 GB × 1 worker" in detail


def test_logs_names_a_whole_role_of_the_fleet():
    from dynkv.supervisor.status import _expand

    records = dict.fromkeys(["etcd", "worker-0", "worker-1", "prefill-0", "decode-0", "decode-1"])
    assert _expand(["worker"], records) == ["worker-0", "worker-1"]
    assert _expand(["decode", "etcd"], records) == ["decode-0", "decode-1", "etcd"]
    assert _expand(["worker-1", "nope"], records) == ["worker-1", "nope"]  # nope: reported unknown
    assert _expand(["worker"], dict.fromkeys(["worker", "worker-1"])) == ["worker"]
