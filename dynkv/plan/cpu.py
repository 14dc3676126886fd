"""How a vLLM engine on the CPU backend gets its cores and its KV cache (G1) size.

All CPU tuning of an engine is chosen here: `split_cores` gives each engine of a fleet (agg
workers, or prefill and decode workers, docs/fleet.md) its own cores, `cpu_engine_env` its
environment. Pin the threads in
every configuration, because vLLM otherwise reserves a core when no KV connector is set and uses
all of them when one is, which alone halves prefill time.

vLLM facts (0.32, vllm/platforms/cpu.py): `VLLM_CPU_KVCACHE_SPACE` is whole GiB and, when set and
non-empty, overrides `--kv-cache-memory-bytes`. So when dynkv passes the flag it also removes the
variable from the engine's environment; without either, vLLM sizes G1 as a fraction of all RAM and
refuses to start on a busy host, hence a small explicit default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DEFAULT_CPU_KV_GIB = 2

CPU_ENV_VARS = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_USE_AOT_COMPILE",
    "GOMP_SPINCOUNT",
)
# vllm-cpu 0.32 saves its AOT-compiled model but cannot load it back ("'function' object has no
# attribute 'finalize_loading'"), so every engine start compiled the model again (~50 s on 2
# cores). With AOT compilation off, vLLM's inductor cache loads on the next start: measured on
# the tiny model, an engine initialises in 29 s instead of 54 s (docs/fleet.md#cpu-engines).
# vLLM's EngineCore (and the API server) run beside the worker on the cores its OpenMP threads are
# bound to (none is reserved). libgomp's default lets an idle OpenMP thread spin for 300,000
# iterations after every parallel region, so each time the worker returns to Python between two
# steps its second thread holds a core that the EngineCore needs to hand it the next step. A short
# spin keeps the threads hot between the ops of one forward pass and frees the core between steps:
# measured on 2 cores, decode 13.5–18.9 → 10.5–14.1 ms a token, a prefix-cache hit 39–43 → 36 ms,
# prefill unchanged (docs/fleet.md#cpu-engines).
CPU_ENGINE_DEFAULTS = {"VLLM_USE_AOT_COMPILE": "0", "GOMP_SPINCOUNT": "10000"}


GiB = 1 << 30


def cpu_kv_cache_bytes(device_kv_gb: float | None, user_env: Mapping[str, str]) -> tuple[int, str]:
    """G1 bytes one CPU engine of a dynkv deployment gets, and where that number comes from.
    The plan and `dynkv doctor` both ask here, so the doctor checks what `up` will start."""
    if device_kv_gb:
        return int(device_kv_gb * 1e9), "DYNKV_DEVICE_KV_GB"
    space = (user_env.get("VLLM_CPU_KVCACHE_SPACE") or "").strip()
    if space.isdigit() and int(space) > 0:
        return int(space) * GiB, "VLLM_CPU_KVCACHE_SPACE"
    return DEFAULT_CPU_KV_GIB * GiB, f"dynkv's CPU default, {DEFAULT_CPU_KV_GIB} GiB"


def cpu_list(cpus: Iterable[int]) -> str:
    """`[0, 1, 2, 5]` → `"0-2,5"`: the syntax of VLLM_CPU_OMP_THREADS_BIND."""
    ids = sorted(set(cpus))
    if not ids:
        raise ValueError("no CPUs to bind")
    parts: list[str] = []
    start = prev = ids[0]
    for cpu in ids[1:] + [None]:  # type: ignore[list-item]
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """`"0-2,5"` → `(0, 1, 2, 5)`, the inverse of `cpu_list` (also `"0-1|2-3"`, vLLM's list per
    rank, as their union). ValueError with the reason for anything else (`auto`, `nobind`)."""
    ids: set[int] = set()
    for part in text.replace("|", ",").split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a list of CPU ids like 0-2,5")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"{text!r}: the range {part} runs backwards")
        ids.update(range(lo, hi + 1))
    return tuple(sorted(ids))


def split_cores(cpus: Iterable[int], engines: int) -> list[tuple[int, ...]]:
    """Disjoint bind lists for `engines` engines: consecutive runs of the cores, as even as they
    go, a later engine taking a spare one (two engines on 5 cores: 0-1 and 2-4). With fewer cores
    than engines, engine i gets core i mod n alone and some cores are shared: `dynkv doctor`
    warns about that (`cpu.cores`), the plan does not refuse it."""
    ids = sorted(set(cpus))
    if not ids:
        raise ValueError("no CPUs to bind")
    if engines < 1:
        raise ValueError("no engine to bind")
    if len(ids) < engines:
        return [(ids[i % len(ids)],) for i in range(engines)]
    size, spare = divmod(len(ids), engines)
    out, start = [], 0
    for i in range(engines):
        n = size + (1 if i >= engines - spare else 0)
        out.append(tuple(ids[start : start + n]))
        start += n
    return out


def cpu_engine_env(
    cores: Iterable[int],
    *,
    engines: int,
    kv_cache_bytes: int | None,
    user_env: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """(environment to set, variables to remove) for one CPU engine bound to `cores`, one of
    `engines` on the host (`split_cores` chose its cores).

    A single engine gets every core the launcher may use, and none is reserved. Several engines
    get disjoint lists, so none steals another's cores (OpenMP threads spin). A value the user
    exported for one of these variables is kept (they asked for it), except the threads binding
    when there are several engines (one binding cannot serve them all), and an explicit G1 size
    (`kv_cache_bytes`, from DYNKV_DEVICE_KV_GB) always wins over VLLM_CPU_KVCACHE_SPACE.
    """
    mine = sorted(set(cores))
    user = {k: v for k, v in (user_env or {}).items() if k in CPU_ENV_VARS and v != ""}
    if engines > 1:
        user.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": user.get("VLLM_CPU_OMP_THREADS_BIND", cpu_list(mine)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": user.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
    }
    env.update({k: user.get(k, v) for k, v in CPU_ENGINE_DEFAULTS.items()})
    unset: tuple[str, ...] = ()
    if kv_cache_bytes is not None:
        unset = ("VLLM_CPU_KVCACHE_SPACE",)  # else it would override --kv-cache-memory-bytes
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = user.get("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_GIB))
    return env, unset
