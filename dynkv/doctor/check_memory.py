"""Host memory: will the host tier (and, on CPU, G1 and the weights) fit in RAM; can G2 be pinned;
is /dev/shm big enough for vLLM's processes and the disagg handoff."""

from __future__ import annotations

import math
import os
import resource
import shutil

import psutil

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, gb, ok, warn
from dynkv.kvbm.handoff import HANDOFF_FIX
from dynkv.kvbm.paths import UnsafePath, private_dir
from dynkv.plan.cpu import cpu_kv_cache_bytes
from dynkv.plan.worker import handoff_dir
from dynkv.settings.deployment import Topology

GiB = 1 << 30
SHM_MIN_BYTES = 1_000_000_000
SHM_FIX = (
    "docker run --shm-size=8g … (or --ipc=host); on a host: sudo mount -o remount,size=8G /dev/shm"
)


def _cpu_g1(ctx: DoctorContext) -> tuple[int, str]:
    """RAM one CPU worker takes for G1 (+ weights), sized exactly as the plan sizes it."""
    weights = ctx.model.weights_bytes or 0
    plus = f" + weights {gb(weights)}" if weights else ""
    kv, source = cpu_kv_cache_bytes(ctx.deployment.device_kv_gb, ctx.env)
    return kv + weights, f"G1 {gb(kv)} ({source}){plus}"


def ram(ctx: DoctorContext) -> Outcome:
    """G2 of every worker that has tiers, plus on CPU every worker's G1 and weights, against the
    available RAM with 10% headroom (docs/fleet.md)."""
    vm = psutil.virtual_memory()
    available, n, tiered = vm.available, ctx.workers, ctx.tiered_workers
    uniform = tiered == n
    parts: list[str] = []
    need = 0
    g2 = ctx.host_tier_bytes()
    if g2 is None:
        parts.append("G2 size in bytes unknown (sized in blocks, model shape unknown)")
    elif g2:
        need += g2 * tiered
        parts.append(f"G2 {gb(g2)}" + _times(tiered, uniform))
    g1_total = 0
    if ctx.device == "cpu":
        g1, how = _cpu_g1(ctx)
        g1_total = g1 * n
        need += g1_total
        parts.append(how + _times(n, uniform))
    per = f" × {n} workers" if n > 1 and uniform else ""
    detail = f"needs {gb(need)} ({' + '.join(parts)}){per} of {gb(available)} available"
    room = available * 0.8 - g1_total
    fit = max(0.1, math.floor(room / max(tiered, 1) / 1e8) / 10)
    fix = f"export DYN_KVBM_CPU_CACHE_GB={fit:g}   # a host tier that fits, or free memory"
    if n > 1:
        fix += ", or run fewer workers"
    if need > available:
        return fail(detail, fix)
    if need > 0.9 * available:
        return warn(detail + ": less than 10% headroom", fix)
    return ok(detail)


def _times(count: int, uniform: bool) -> str:
    """' × 2 workers' after one part, when the parts multiply by different worker counts
    (disagg: G2 on the prefill workers only, G1 on all of them); else said once at the end."""
    return "" if uniform else f" × {count} worker{'s' if count != 1 else ''}"


def memlock(ctx: DoctorContext) -> Outcome | None:
    if ctx.device != "cuda":
        return None  # no CUDA: G2 is ordinary pageable memory, nothing is pinned
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return ok("memlock unlimited: G2 can be pinned")
    g2 = ctx.host_tier_bytes()
    shown = f"{soft // 1024:,} KiB" if soft < 1 << 30 else gb(soft)
    if g2 is not None and soft >= g2:
        return ok(f"memlock {shown} ≥ G2 {gb(g2)}")
    return warn(
        f"memlock limit (ulimit -l) is {shown}: pinning G2 may fail and fall back to pageable "
        "memory (slower GPU copies)",
        "ulimit -l unlimited   # in docker: --ulimit memlock=-1",
    )


def shm(ctx: DoctorContext) -> Outcome:
    path = "/dev/shm"
    disagg = ctx.deployment.topology == Topology.DISAGG
    if not os.path.isdir(path):
        detail = f"{path} does not exist: vLLM's worker processes and the disagg handoff use it"
        return (fail if disagg else warn)(detail, SHM_FIX)
    if disagg:
        pool = handoff_dir(ctx.deployment.name)
        try:  # a pool dir another user made first would fail the prefill worker (docs/security.md)
            private_dir(pool, HANDOFF_FIX, create=False, tighten=False)
        except UnsafePath as exc:
            return fail(exc.cause, exc.fix)
        except OSError:
            pass  # not there yet: the prefill worker creates it
    usage = shutil.disk_usage(path)
    need = SHM_MIN_BYTES
    why = "vLLM's worker processes exchange data through it"
    if disagg:
        why = "the disagg prefill → decode handoff stages KV there"
        kvbpt, max_len = ctx.kv_bytes_per_token, ctx.deployment.max_model_len
        if kvbpt and max_len:
            # two requests of the longest length in flight, in each prefill worker's pool
            need = max(need, 2 * ctx.deployment.prefill_workers * kvbpt * max_len)
    detail = f"{path}: {gb(usage.free)} free of {gb(usage.total)}"
    if usage.free < need:
        return warn(f"{detail}, below {gb(need)}: {why}", SHM_FIX)
    return ok(detail)


CHECKS = [
    Check("memory.ram", "RAM for the host tier", ram),
    Check("memory.memlock", "pinned memory limit", memlock),
    Check("memory.shm", "shared memory (/dev/shm)", shm),
]
