"""What the connector derives from vLLM's configuration: the block layout and the KVBM settings.

Both connector halves (scheduler process, worker process) compute the layout from the same
configuration objects, so their fingerprints — and therefore block keys and disk journals — agree
without talking to each other. The worker checks its real KV tensors against it at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.layout import BlockLayout


def settings_from(vllm_config: Any) -> KvbmSettings:
    """`DYN_KVBM_*` from the environment, overridden by `kv_connector_extra_config` keys (field
    names, e.g. {"cpu_cache_gb": 2}), as Dynamo's connector is configured."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    unknown = sorted(set(extra) - set(KvbmSettings.model_fields))
    if unknown:
        raise KvbmConfigError(
            f"unknown kv_connector_extra_config keys for the dynkv connector: {unknown}",
            "use KVBM setting names such as cpu_cache_gb, disk_cache_gb, disk_cache_dir",
        )
    try:
        return KvbmSettings(**extra)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        raise KvbmConfigError(
            f"{KvbmSettings.env_name(name)}={err.get('input')!r} is invalid: {err['msg']}",
            f"fix {KvbmSettings.env_name(name)} (or kv_connector_extra_config[{name!r}])",
        ) from None


def _cpu_isa(spec: Any) -> str:
    """The CPU attention kernel packs K/V per instruction set: blocks written with AMX kernels
    are not readable by AVX kernels. Part of the fingerprint on CPU."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return str(_get_attn_isa(spec.dtype, spec.block_size, spec.head_size))
    except Exception:
        return "unknown-isa"


def layout_from(vllm_config: Any, kv_cache_config: Any) -> BlockLayout:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise KvbmConfigError(
            f"this model has {len(groups)} KV cache groups (hybrid or sliding-window attention); "
            "the dynkv KVBM connector supports models with one",
            "serve this model without --kv-transfer-config, or use a full-attention model",
        )
    spec = groups[0].kv_cache_spec
    from vllm.platforms import current_platform

    platform = current_platform.device_type
    device_layout = f"{platform}:{kv_cache_config.kv_cache_layout or 'default'}"
    if platform == "cpu":
        device_layout += f":{_cpu_isa(spec)}"
    parallel = vllm_config.parallel_config
    device_layout += f":tp{parallel.tensor_parallel_size}:pp{parallel.pipeline_parallel_size}"
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    return BlockLayout(
        model=str(vllm_config.model_config.model),
        dtype=str(spec.dtype).removeprefix("torch."),
        block_size=int(spec.block_size),
        num_layers=len(groups[0].layer_names),
        bytes_per_layer_block=int(spec.page_size_bytes),
        layer_block_shape=(
            int(spec.num_kv_heads),
            int(spec.block_size),
            int(spec.head_size + head_v),
        ),
        device_layout=device_layout,
    )


def disk_dir_for_rank(settings: KvbmSettings, rank: int, world_size: int) -> KvbmSettings:
    """Each tensor-parallel worker keeps its shard of every block in its own pool."""
    if world_size <= 1:
        return settings
    return settings.model_copy(
        update={"disk_cache_dir": Path(settings.disk_cache_dir) / f"rank{rank}"}
    )
