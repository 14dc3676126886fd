"""The float32 fallback of CPU workers without native bfloat16 (dynkv.plan.dtype)."""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_support import plan_for

from dynkv.doctor.context import DoctorContext
from dynkv.model.presets import kv_bytes_per_token
from dynkv.plan.dtype import cpu_bf16_native, default_dtype_argv
from dynkv.settings import resolve

AMD_EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16\n"
CONFIG = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("text", "native"), [(AMD_EPYC, False), (SAPPHIRE_RAPIDS, True), (GRAVITON, True)]
)
def test_only_x86_without_amx_lacks_native_bf16(tmp_path: Path, text: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_bf16_native(cpuinfo) is native


def test_unreadable_cpuinfo_keeps_vllms_default(tmp_path: Path) -> None:
    assert cpu_bf16_native(tmp_path / "absent") is True


@pytest.mark.parametrize(
    ("device", "native", "engine", "expected"),
    [
        ("cpu", False, (), ("--dtype", "float32")),
        ("cpu", True, (), ()),
        ("cuda", False, (), ()),
        ("cpu", False, ("--dtype", "bfloat16"), ()),
        ("cpu", False, ("--dtype=half",), ()),
    ],
)
def test_fallback_only_where_needed_and_never_over_the_users_choice(
    device, native, engine, expected
) -> None:
    assert default_dtype_argv(device, native, engine) == expected


def _worker_argv(plan) -> tuple[str, ...]:
    return plan.workers[0].argv


def test_cpu_without_amx_plans_float32_for_every_worker_and_says_why() -> None:
    plan = plan_for({"DYNKV_TOPOLOGY": "disagg"}, cpu_bf16_native=False)
    for worker in plan.workers:
        i = worker.argv.index("--dtype")
        assert worker.argv[i + 1] == "float32"
    assert any("no AMX" in note and "--dtype bfloat16" in note for note in plan.notes)


def test_native_bf16_and_cuda_plans_are_unchanged() -> None:
    assert "--dtype" not in _worker_argv(plan_for(cpu_bf16_native=True))
    assert "--dtype" not in _worker_argv(plan_for(device="cuda", cpu_bf16_native=False))
    assert not any("AMX" in note for note in plan_for(cpu_bf16_native=True).notes)


def test_users_dtype_after_dashdash_wins(tmp_path: Path) -> None:
    from plan_support import host

    from dynkv.plan import build_plan

    resolved = resolve(env={"DYNKV_STATE_DIR": str(tmp_path)}, engine_args=["--dtype", "bfloat16"])
    argv = _worker_argv(build_plan(resolved, host(cpu_bf16_native=False)))
    assert argv.count("--dtype") == 1
    assert argv[argv.index("--dtype") + 1] == "bfloat16"


def test_doctor_sizes_kv_in_the_dtype_the_workers_serve() -> None:
    bf16 = kv_bytes_per_token(CONFIG)
    assert bf16 == 2 * 30 * 3 * 64 * 2  # 23,040 bytes a token: SmolLM2-135M in bfloat16
    assert kv_bytes_per_token(CONFIG, "float32") == 2 * bf16
    assert kv_bytes_per_token(CONFIG, "auto") == bf16
    plan = plan_for(cpu_bf16_native=False)
    ctx = DoctorContext(resolved=resolve(env={}), import_vllm=False, plan=plan)
    assert ctx.serving_dtype == "float32"
    # a standalone doctor (no plan) sizes KV in the dtype `up` would give the workers
    resolved = resolve(env={"DYNKV_DEVICE": "cpu"})
    for native, dtype in ((True, None), (False, "float32")):
        ctx = DoctorContext(resolved=resolved, import_vllm=False, cpu_bf16_native=native)
        assert ctx.serving_dtype == dtype
    chosen = resolve(env={"DYNKV_DEVICE": "cpu"}, engine_args=("--dtype", "bfloat16"))
    ctx = DoctorContext(resolved=chosen, import_vllm=False, cpu_bf16_native=False)
    assert ctx.serving_dtype == "bfloat16"
