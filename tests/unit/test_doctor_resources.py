"""Memory, tier sizing, settings and model checks, on this machine's real RAM and files."""

from __future__ import annotations

import json
import resource
import shutil

import psutil
import pytest
from doctor_support import base_env, cuda_build, gpus, run

from dynkv.doctor import Status, check_memory
from dynkv.doctor.model import hf_snapshot, locate_model
from dynkv.model.presets import PRESETS, kv_bytes_per_token

# the `bench` model: hidden 768, 12 layers, 12 heads, 3 KV heads, bf16 → 9,216 bytes per token.
BENCH = {
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 3,
    "hidden_size": 768,
    "torch_dtype": "bfloat16",
}


def write_model(path, config=BENCH, weights=1_000_000):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0" * weights)
    return path


# --- KV arithmetic ------------------------------------------------------------------------------
def test_kv_bytes_per_token_matches_the_reference_model():
    assert kv_bytes_per_token(BENCH) == 9_216


def test_kv_bytes_per_token_variants():
    assert kv_bytes_per_token({**BENCH, "head_dim": 128}) == 2 * 12 * 3 * 128 * 2
    assert kv_bytes_per_token({**BENCH, "torch_dtype": "float32"}) == 18_432
    assert kv_bytes_per_token({"text_config": BENCH}) == 9_216
    del_kv = {k: v for k, v in BENCH.items() if k != "num_key_value_heads"}
    assert kv_bytes_per_token(del_kv) == 2 * 12 * 12 * 64 * 2  # MHA
    mla = {
        "num_hidden_layers": 61,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "torch_dtype": "bfloat16",
    }
    assert kv_bytes_per_token(mla) == 61 * 576 * 2
    # one arithmetic for the generated presets and any config: they agree, dtype override included
    bench = PRESETS["bench"]
    assert kv_bytes_per_token(bench) == kv_bytes_per_token(BENCH) == bench.kv_bytes_per_token
    assert kv_bytes_per_token(bench, "float32") == 2 * kv_bytes_per_token(bench, "auto")


def test_tier_blocks_are_computed_from_the_model(tmp_path):
    model = write_model(tmp_path / "m")
    res = run(
        base_env(
            tmp_path, DYNKV_MODEL=str(model), DYN_KVBM_CPU_CACHE_GB="4", DYN_KVBM_DISK_CACHE_GB="8"
        )
    )
    detail = res["tiers.blocks"].detail
    bpb = 32 * 9_216
    assert f"{bpb:,} B per block" in detail
    assert f"G2 4 GB = {int(4e9 // bpb):,} blocks" in detail
    assert f"G3 8 GB = {int(8e9 // bpb):,} blocks" in detail
    assert f"= {int(0.5e9 // bpb):,} blocks" in detail  # G1 from DYNKV_DEVICE_KV_GB


def test_g1_must_hold_one_sequence_of_the_model_length(tmp_path):
    model = write_model(tmp_path / "m", config={**BENCH, "max_position_embeddings": 8192})
    env = base_env(tmp_path, DYNKV_MODEL=str(model), DYNKV_DEVICE_KV_GB="0.01")
    small = run({**env, "DYNKV_MAX_MODEL_LEN": "2048"})["tiers.one_sequence"]
    tokens = int(0.01e9 // (32 * 9_216)) * 32  # 33 blocks of the bench model in bfloat16
    assert small.status is Status.FAIL
    assert f"holds {tokens:,} tokens, fewer than one sequence of 2,048" in small.detail
    assert "DYNKV_MAX_MODEL_LEN" in small.detail
    assert "DYNKV_DEVICE_KV_GB=" in small.fix and f"DYNKV_MAX_MODEL_LEN={tokens - 64}" in small.fix
    fits = run({**env, "DYNKV_MAX_MODEL_LEN": "1024"})["tiers.one_sequence"]
    assert fits.status is Status.OK and "one 1,024-token sequence fits" in fits.detail
    # without a length the model's own context counts; in float32 (a CPU without AMX) half fits
    model_len = run(env)["tiers.one_sequence"]
    assert model_len.status is Status.FAIL and "8,192 (the model's context)" in model_len.detail
    f32 = run({**env, "DYNKV_MAX_MODEL_LEN": "1024"}, cpu_bf16_native=False)["tiers.one_sequence"]
    assert f32.status is Status.FAIL and "float32" in f32.detail


def test_g1_check_says_nothing_when_the_shape_is_unknown(tmp_path):
    res = run(base_env(tmp_path, DYNKV_MODEL="org/not-cached"))
    assert "tiers.one_sequence" not in res


def test_block_override_wins(tmp_path):
    model = write_model(tmp_path / "m")
    env = base_env(tmp_path, DYNKV_MODEL=str(model), DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="1000")
    assert "G2 1,000 blocks (override) = 1,000 blocks" in run(env)["tiers.blocks"].detail


def test_unknown_model_shape_is_said_not_guessed(tmp_path):
    res = run(base_env(tmp_path, DYNKV_MODEL="org/not-cached"))
    assert res["tiers.blocks"].status is Status.OK
    assert "block counts unknown" in res["tiers.blocks"].detail


def test_no_tier_at_all_fails(tmp_path):
    env = base_env(tmp_path, DYN_KVBM_CPU_CACHE_GB="0", DYN_KVBM_DISK_CACHE_GB="0")
    check = run(env)["tiers.blocks"]
    assert check.status is Status.FAIL and "DYN_KVBM_CPU_CACHE_GB" in check.fix


def test_device_kv_default_is_named(tmp_path):
    env = base_env(tmp_path)
    del env["DYNKV_DEVICE_KV_GB"]
    assert "dynkv's CPU default" in run(env)["tiers.blocks"].detail


def test_smaller_lower_tiers_warn(tmp_path):
    env = base_env(
        tmp_path, DYNKV_DEVICE_KV_GB="2", DYN_KVBM_CPU_CACHE_GB="1", DYN_KVBM_DISK_CACHE_GB="0.5"
    )
    check = run(env)["tiers.order"]
    assert check.status is Status.WARN
    assert "G2 (1.0 GB) is smaller than G1 (2.0 GB)" in check.detail
    assert "G3 (0.5 GB) is smaller than G2 (1.0 GB)" in check.detail
    assert check.fix == "export DYN_KVBM_CPU_CACHE_GB=2 && export DYN_KVBM_DISK_CACHE_GB=1"
    ok = run(base_env(tmp_path))["tiers.order"]
    assert ok.status is Status.OK and "G1 0.5 GB ≤ G2 1.0 GB ≤ G3 2.0 GB" in ok.detail


# --- memory ------------------------------------------------------------------------------------
def test_host_tier_that_fits(tmp_path):
    assert run(base_env(tmp_path))["memory.ram"].status is Status.OK


def test_host_tier_bigger_than_ram_fails_with_a_size_that_fits(tmp_path):
    too_big = psutil.virtual_memory().total / 1e9 * 2
    env = base_env(tmp_path, DYN_KVBM_CPU_CACHE_GB=f"{too_big:.0f}", DYNKV_TOPOLOGY="disagg")
    check = run(env)["memory.ram"]
    assert check.status is Status.FAIL
    assert "× 2 workers" in check.detail
    fit = float(check.fix.split("=")[1].split()[0])
    # G2 is the prefill worker's alone (a disagg decode worker is tierless)
    assert 0 < fit < psutil.virtual_memory().available / 1e9


def test_cpu_g1_is_sized_as_the_plan_sizes_it(tmp_path):
    from dynkv.plan.cpu import DEFAULT_CPU_KV_GIB

    env = base_env(tmp_path)
    del env["DYNKV_DEVICE_KV_GB"]
    check = run(env)["memory.ram"]
    assert f"dynkv's CPU default, {DEFAULT_CPU_KV_GIB} GiB" in check.detail
    env["VLLM_CPU_KVCACHE_SPACE"] = "3"
    assert "VLLM_CPU_KVCACHE_SPACE" in run(env)["memory.ram"].detail


def test_memlock_only_matters_with_a_gpu(tmp_path):
    assert "memory.memlock" not in run(base_env(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("memlock is already unlimited here")
    check = run(base_env(tmp_path), nvml=gpus(1), build=cuda_build())["memory.memlock"]
    assert check.status is Status.WARN
    assert check.fix.startswith("ulimit -l unlimited") and "--ulimit memlock=-1" in check.fix
    # A host tier within the limit can be pinned.
    small = base_env(tmp_path, DYN_KVBM_CPU_CACHE_GB=f"{soft * 0.9 / 1e9:.6f}")
    check = run(small, nvml=gpus(1), build=cuda_build())["memory.memlock"]
    assert check.status is Status.OK, check
    try:  # raising the hard limit needs CAP_SYS_RESOURCE, which a container may not grant
        resource.setrlimit(
            resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
    except (ValueError, OSError):
        return
    try:
        check = run(base_env(tmp_path), nvml=gpus(1), build=cuda_build())["memory.memlock"]
        assert check.status is Status.OK and "unlimited" in check.detail
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def _shm(monkeypatch, free: float | None, total: float = 64e9) -> None:
    """/dev/shm as a given size (None: missing): the one fact of this host a test cannot set."""
    monkeypatch.setattr(
        check_memory.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(total, 0, free)
    )
    real_isdir = check_memory.os.path.isdir
    monkeypatch.setattr(
        check_memory.os.path,
        "isdir",
        lambda p: free is not None if p == "/dev/shm" else real_isdir(p),
    )


@pytest.mark.parametrize(
    ("topology", "free", "status", "words"),
    [
        ("agg", 8e9, Status.OK, "/dev/shm: 8.0 GB free of 64.0 GB"),
        ("agg", 0.5e9, Status.WARN, "below 1.0 GB: vLLM's worker processes"),
        ("disagg", 8e9, Status.OK, "/dev/shm: 8.0 GB free"),
        # the handoff of two 131,072-token prompts of the reference model: 2 × 9,216 B × 131,072
        ("disagg", 2e9, Status.WARN, "below 2.4 GB: the disagg prefill → decode handoff"),
        ("agg", None, Status.WARN, "/dev/shm does not exist"),
        ("disagg", None, Status.FAIL, "/dev/shm does not exist"),
    ],
)
def test_shm_status_for_each_situation(tmp_path, monkeypatch, topology, free, status, words):
    model = write_model(tmp_path / "m")
    env = base_env(
        tmp_path, DYNKV_TOPOLOGY=topology, DYNKV_MODEL=str(model), DYNKV_MAX_MODEL_LEN="131072"
    )
    _shm(monkeypatch, free)
    check = run(env)["memory.shm"]
    assert check.status is status, check
    assert words in check.detail
    assert (check.fix == check_memory.SHM_FIX) is (status is not Status.OK)


# --- settings ----------------------------------------------------------------------------------
def test_unknown_kvbm_variable_is_a_warning_with_the_name(tmp_path):
    check = run(base_env(tmp_path, DYN_KVBM_CPU_CACHE_G="1"))["settings.variables"]
    assert check.status is Status.WARN
    assert "did you mean DYN_KVBM_CPU_CACHE_GB?" in check.detail
    assert check.fix.startswith("unset DYN_KVBM_CPU_CACHE_G ")


def test_experimental_profile_warns(tmp_path):
    env = base_env(tmp_path)
    del env["DYN_KVBM_CPU_CACHE_GB"]
    check = run(env, profile="gpu-disk")["settings.profile"]
    assert check.status is Status.WARN and "experimental" in check.detail


def test_odd_block_size_on_cpu_warns(tmp_path):
    assert (
        run(base_env(tmp_path, DYNKV_BLOCK_SIZE="16"))["settings.block_size"].status is Status.WARN
    )


# --- model -------------------------------------------------------------------------------------
def test_local_model_directory(tmp_path):
    model = write_model(tmp_path / "m")
    check = run(base_env(tmp_path, DYNKV_MODEL=str(model)))["model.source"]
    assert check.status is Status.OK and "local directory" in check.detail


def test_model_path_without_config_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    check = run(base_env(tmp_path, DYNKV_MODEL=str(tmp_path / "empty")))["model.source"]
    assert check.status is Status.FAIL and "config.json" in check.detail


def test_model_in_the_hf_cache_is_found_offline(tmp_path):
    env = base_env(tmp_path, DYNKV_MODEL="org/name")
    repo = tmp_path / "hf" / "hub" / "models--org--name"
    write_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert hf_snapshot("org/name", tmp_path / "hf" / "hub") == repo / "snapshots" / "abc123"
    res = run(env)
    assert (
        res["model.source"].status is Status.OK
        and "Hugging Face cache" in res["model.source"].detail
    )
    assert f"{32 * 9216:,} B per block" in res["tiers.blocks"].detail


def test_uncached_model_warns_and_fails_offline(tmp_path):
    env = base_env(tmp_path, DYNKV_MODEL="org/absent")
    check = run(env)["model.source"]
    assert check.status is Status.WARN and check.fix == "hf download org/absent"
    offline = run({**env, "HF_HUB_OFFLINE": "1"})["model.source"]
    assert offline.status is Status.FAIL and "HF_HUB_OFFLINE" in offline.detail


def test_no_model_on_cpu_means_smollm2_fetched_on_first_start(tmp_path):
    res = run(base_env(tmp_path))
    check = res["model.source"]
    assert check.status is Status.OK and "smollm2-135m-instruct" in check.detail
    assert "fetched on first start" in check.detail
    # its shape is known before the fetch: 30 layers × 3 KV heads × 64 × 2 × bf16
    assert f"{32 * 23040:,} B per block" in res["tiers.blocks"].detail
    write_model(tmp_path / "cache" / "dynkv" / "models" / "smollm2-135m-instruct")
    assert "in the model cache" in run(base_env(tmp_path))["model.source"].detail


def test_the_tiny_model_by_name_is_the_generated_one(tmp_path):
    env = base_env(tmp_path, DYNKV_MODEL="dynkv-tiny")
    res = run(env)
    assert res["model.source"].status is Status.OK and "generated" in res["model.source"].detail
    on_gpu = run(env, nvml=gpus(1), build=cuda_build())
    assert on_gpu["model.source"].status is Status.WARN


def test_generated_model_already_present_gives_block_counts(tmp_path):
    env = base_env(tmp_path, DYNKV_MODEL="dynkv-tiny")
    write_model(tmp_path / "cache" / "dynkv" / "models" / "tiny")
    assert locate_model("dynkv-tiny", env).config == BENCH
    assert "blocks" in run(env)["tiers.blocks"].detail


def test_hf_token_is_reported_but_never_shown(tmp_path):
    secret = "hf_SeCrEtVaLuE1234567890"
    res = run(base_env(tmp_path, HF_TOKEN=secret, DYNKV_MODEL="org/absent"))
    assert (
        res["model.hf_token"].status is Status.OK
        and "HF_TOKEN is set" in res["model.hf_token"].detail
    )
    for r in res.values():
        for text in (r.detail, r.fix or ""):
            assert secret not in text and secret[:8] not in text and secret[-6:] not in text


def test_missing_hf_token_warns_for_a_hub_download(tmp_path):
    check = run(base_env(tmp_path, DYNKV_MODEL="org/absent"))["model.hf_token"]
    assert check.status is Status.WARN and "HF_TOKEN" in check.fix


def test_weights_of_a_local_model_count_on_cpu(tmp_path):
    model = write_model(tmp_path / "m", weights=3_000_000)
    env = base_env(tmp_path, DYNKV_MODEL=str(model), DYNKV_TOPOLOGY="disagg")
    detail = run(env)["memory.ram"].detail
    assert "G1 0.5 GB (DYNKV_DEVICE_KV_GB) + weights 3.0 MB × 2 workers" in detail
    # G2 1 GB on the prefill worker only (decode is tierless) + 2 × (G1 0.5 GB + 3 MB)
    assert "G2 1.0 GB × 1 worker" in detail and "needs 2.0 GB" in detail


def test_shm_counts_a_handoff_pool_per_prefill_worker(tmp_path, monkeypatch):
    """Two prefill workers, a pool each: room for two of the longest prompts in each."""
    model = write_model(tmp_path / "m")
    env = base_env(
        tmp_path,
        DYNKV_TOPOLOGY="disagg",
        DYNKV_PREFILL_WORKERS="2",
        DYNKV_MODEL=str(model),
        DYNKV_MAX_MODEL_LEN="131072",
    )
    _shm(monkeypatch, 3e9)  # enough for one prefill worker (2.4 GB), not for two
    check = run(env)["memory.shm"]
    assert check.status is Status.WARN and "below 4.8 GB" in check.detail
