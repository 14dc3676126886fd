"""Tier sizing in blocks, as the runtime will compute it, and whether each tier is at least as big
as the one above it (write-through: a smaller lower tier churns, evicting what it just stored)."""

from __future__ import annotations

from dynkv.doctor.context import DoctorContext
from dynkv.doctor.result import Check, Outcome, fail, gb, ok, warn
from dynkv.plan.cpu import cpu_kv_cache_bytes
from dynkv.plan.dtype import argv_value


def _device_kv(ctx: DoctorContext) -> tuple[int | None, str]:
    """G1 bytes per worker (None when vLLM picks it) and how to say so."""
    if ctx.deployment.device_kv_gb:
        return int(ctx.deployment.device_kv_gb * 1e9), f"{gb(ctx.deployment.device_kv_gb * 1e9)}"
    if ctx.device == "cpu":
        kv, source = cpu_kv_cache_bytes(None, ctx.env)
        return kv, f"{gb(kv)} ({source})"
    return None, "vLLM's default (unset: 92% of GPU memory minus weights and activations)"


def blocks(ctx: DoctorContext) -> Outcome:
    k = ctx.kvbm
    if not ctx.deployment.kvbm:
        return ok(f"no KVBM connector (DYNKV_KVBM=false): G1 only ({_device_kv(ctx)[1]})")
    if not (k.has_host_tier or k.has_disk_tier):
        return fail(
            f"no KVBM tier is configured (profile {ctx.resolved.profile.name!r} and the environment "
            "set neither DYN_KVBM_CPU_CACHE_GB nor DYN_KVBM_DISK_CACHE_GB)",
            "export DYN_KVBM_CPU_CACHE_GB=4   # or --profile gpu-cpu-disk",
        )
    bpb = ctx.bytes_per_block
    g1_bytes, g1_text = _device_kv(ctx)
    if bpb is None:
        model = ctx.deployment.model or "the default model (not fetched yet)"
        sizes = [f"G1 {g1_text}"]
        if k.has_host_tier:
            sizes.append(f"G2 {_tier_text(k.cpu_cache_gb, k.cpu_cache_override_num_blocks)}")
        if k.has_disk_tier:
            sizes.append(f"G3 {_tier_text(k.disk_cache_gb, k.disk_cache_override_num_blocks)}")
        return ok(
            f"{'; '.join(sizes)}; block counts unknown: the KV shape of {model} is not readable "
            "offline (config.json)"
        )
    block = ctx.deployment.block_size
    parts = [f"{block} tokens × {ctx.kv_bytes_per_token:,} B = {bpb:,} B per block"]
    parts.append(f"G1 {g1_text}" + (f" = {g1_bytes // bpb:,} blocks" if g1_bytes else ""))
    if k.has_host_tier:
        parts.append(
            f"G2 {_tier_text(k.cpu_cache_gb, k.cpu_cache_override_num_blocks)} = {k.host_blocks(bpb):,} blocks"
        )
    if k.has_disk_tier:
        parts.append(
            f"G3 {_tier_text(k.disk_cache_gb, k.disk_cache_override_num_blocks)} = {k.disk_blocks(bpb):,} blocks"
        )
    return ok("; ".join(parts))


def _tier_text(size_gb: float | None, override: int | None) -> str:
    if override:
        return f"{override:,} blocks (override)"
    return f"{size_gb:g} GB"


def order(ctx: DoctorContext) -> Outcome | None:
    k = ctx.kvbm
    if not (k.has_host_tier or k.has_disk_tier):
        return None
    g1, _ = _device_kv(ctx)
    g2 = ctx.host_tier_bytes() if k.has_host_tier else None
    g3 = ctx.disk_tier_bytes() if k.has_disk_tier else None
    problems, fixes = [], []
    upper = g2 if k.has_host_tier else g1  # what G3 sits under
    if g1 and g2 is not None and k.has_host_tier and g2 < g1:
        problems.append(
            f"G2 ({gb(g2)}) is smaller than G1 ({gb(g1)}): write-through churns the host pool"
        )
        fixes.append(f"export DYN_KVBM_CPU_CACHE_GB={g1 / 1e9:g}")
    if g3 is not None and upper and g3 < upper:
        name = "G2" if k.has_host_tier else "G1"
        problems.append(
            f"G3 ({gb(g3)}) is smaller than {name} ({gb(upper)}): disk evicts what it just stored"
        )
        fixes.append(f"export DYN_KVBM_DISK_CACHE_GB={upper / 1e9:g}")
    if problems:
        return warn("; ".join(problems), " && ".join(fixes))
    chain = (
        [("G1", g1)]
        + ([("G2", g2)] if k.has_host_tier else [])
        + ([("G3", g3)] if k.has_disk_tier else [])
    )
    known = [f"{name} {gb(size)}" for name, size in chain if size]
    unknown = [name for name, size in chain if not size]
    detail = (
        " ≤ ".join(known) if len(known) > 1 else "each tier is at least the size of the one above"
    )
    if unknown:
        detail += f" ({', '.join(unknown)} not compared: size not known before start)"
    return ok(detail)


def _max_model_len(ctx: DoctorContext) -> tuple[int | None, str]:
    """The longest sequence a worker must hold, and where that number comes from: the workers'
    `--max-model-len` (DYNKV_MAX_MODEL_LEN or an engine argument), else the model's own."""
    value = argv_value(ctx.worker_argv, "--max-model-len")
    if value is not None and value.isdigit():
        return int(value), "--max-model-len"
    if ctx.deployment.max_model_len:
        return ctx.deployment.max_model_len, "DYNKV_MAX_MODEL_LEN"
    length = (ctx.model.config or {}).get("max_position_embeddings")
    return (length, "the model's context") if isinstance(length, int) else (None, "")


def one_sequence(ctx: DoctorContext) -> Outcome | None:
    """vLLM refuses to start when G1 cannot hold one sequence of the model length (after loading
    the weights, a minute in): say it before anything starts, with both ways out."""
    g1, g1_text = _device_kv(ctx)
    bpb = ctx.bytes_per_block
    length, source = _max_model_len(ctx)
    if not (g1 and bpb and length):
        return None
    block = ctx.deployment.block_size
    tokens = g1 // bpb * block
    dtype = f", {ctx.serving_dtype}" if ctx.serving_dtype else ""
    if tokens >= length:
        return ok(
            f"G1 {g1_text} holds {tokens:,} tokens{dtype}: one {length:,}-token sequence fits"
        )
    need = -(-length // block) * bpb * 1.05  # vLLM keeps a little of G1 for itself
    return fail(
        f"G1 {g1_text} holds {tokens:,} tokens{dtype}, fewer than one sequence of {length:,} "
        f"({source}): vLLM would refuse to start",
        f"export DYNKV_DEVICE_KV_GB={need / 1e9:.3g}   # or lower the model length: "
        f"export DYNKV_MAX_MODEL_LEN={max(block, tokens - 2 * block)}",
    )


CHECKS = [
    Check("tiers.blocks", "tier sizes in blocks", blocks),
    Check("tiers.order", "tier order (write-through)", order),
    Check("tiers.one_sequence", "G1 holds one sequence of the model length", one_sequence),
]
