"""KVBM runtime settings, read from the seed's `DYN_KVBM_*` environment variables.

This model lives inside the runtime library because vLLM loads the runtime in its own processes,
where the environment is the only configuration channel (as with Dynamo's KVBM). The launcher
composes the same model with profile files and flags, then hands workers the resolved values back
as environment variables, so both sides agree on one meaning for every variable.

Deliberate differences from Dynamo: boolean variables mean what they say (`false`/`0`/`no` are
false; Dynamo treats any value as true), and sizes are validated (`abc` or `-1` is an error, not 0).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from dynkv.kvbm.env_settings import EnvSettings, env_config, flag, positive, seconds
from dynkv.kvbm.env_settings import expect as _expect

ENV_PREFIX = "DYN_KVBM_"
# A handoff pool's id: a directory name inside DYN_KVBM_HANDOFF_DIR, and a value that arrives from
# the network in kv_transfer_params. No dots or slashes: an id never names anything outside the
# handoff area, whatever a request says (docs/security.md).
POOL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def default_disk_cache_dir() -> Path:
    """Where G3 lives when nothing says otherwise: the user's cache dir, never a shared /tmp
    (the XDG rule of `dynkv.xdg`, applied here because this package imports nothing else)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynkv" / "kvbm-disk"


class KvbmSettings(EnvSettings):
    """Every knob of the bundled KVBM runtime; field `x` is environment variable `DYN_KVBM_X`."""

    model_config = env_config(ENV_PREFIX)

    cpu_cache_gb: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Host-memory tier (G2) size in decimal GB (1 GB = 1e9 bytes). 0 or unset: no G2.",
        json_schema_extra=_expect("a number of decimal GB ≥ 0", "4"),
    )
    disk_cache_gb: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Disk tier (G3) size in decimal GB. 0 or unset: no G3.",
        json_schema_extra=_expect("a number of decimal GB ≥ 0", "8"),
    )
    cpu_cache_override_num_blocks: int | None = Field(
        None,
        ge=0,
        description="G2 size in blocks; a value > 0 wins over DYN_KVBM_CPU_CACHE_GB.",
        json_schema_extra=_expect("a whole number of blocks ≥ 0", "1024"),
    )
    disk_cache_override_num_blocks: int | None = Field(
        None,
        ge=0,
        description="G3 size in blocks; a value > 0 wins over DYN_KVBM_DISK_CACHE_GB.",
        json_schema_extra=_expect("a whole number of blocks ≥ 0", "1024"),
    )
    disable_disk_offload_filter: bool = flag(
        False,
        "Offload every block G2 evicts to G3, not only blocks reused at least twice.",
        "true",
    )
    disk_zerofill_fallback: bool = flag(
        False,
        "Preallocate G3 by writing zeros where the filesystem lacks fallocate(2).",
        "true",
    )
    disk_disable_o_direct: bool = flag(
        False,
        "Use buffered I/O for G3 (filesystems that refuse O_DIRECT, e.g. ramfs).",
        "true",
    )
    disk_cache_dir: Path = Field(
        default_factory=default_disk_cache_dir,
        description="Directory of the G3 pool files (created 0700).",
        json_schema_extra=_expect("a directory path", "/mnt/nvme/dynkv"),
    )
    disk_read_timeout_ms: float = positive(
        5000.0,
        "Deadline of one load's G3 reads: blocks not read by then are recomputed "
        "(a stalled disk costs this much per load instead of freezing the engine).",
        "a number of milliseconds > 0",
        "5000",
    )
    onboard_policy: Literal["auto", "always"] = Field(
        "auto",
        description="auto: onboard only the part of a KVBM hit whose measured load time beats "
        "recomputing it (docs/onboard-policy.md); always: onboard every hit.",
        json_schema_extra=_expect("auto or always", "always"),
    )
    onboard_margin: float = positive(
        0.9,
        "auto policy: load a block only when its load time is below this fraction "
        "of the time to recompute it.",
        "a number > 0",
        "0.9",
    )
    onboard_probe_secs: float = seconds(
        30.0,
        "auto policy: a tier not measured for this long is loaded once more, to "
        "measure it again (a disk that was busy is not skipped for good); a prefill "
        "length not measured for this long is not published to the router.",
        "30",
    )
    host_verify: Literal["sampled", "always"] = Field(
        "sampled",
        description="G2 loads: sampled verifies a random 1 in 8 blocks of each load (at least "
        "one) against its key and checksum; always verifies every block. G3 and handoff blocks "
        "are verified on every load either way (docs/kvbm.md#integrity-never-waits-never-lies).",
        json_schema_extra=_expect("sampled or always", "always"),
    )
    host_prefault: bool = flag(
        True,
        "Commit G2's memory when the worker starts (~0.3 s per GB) instead of page by page at "
        "each block's first store, where a cold request paid it (docs/kvbm.md#g2-memory).",
        "false",
    )
    leader_worker_init_timeout_secs: float = seconds(
        120.0,
        "How long the runtime waits for its tiers to initialise before failing.",
        "120",
    )
    metrics: bool = flag(
        False,
        "Serve the kvbm_* Prometheus metrics on DYN_KVBM_METRICS_PORT.",
        "true",
    )
    metrics_port: int = Field(
        6880,
        ge=1,
        le=65535,
        description="Port of the KVBM metrics endpoint (bound to 127.0.0.1 unless told otherwise).",
        json_schema_extra=_expect("a TCP port 1–65535", "6880"),
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the KVBM metrics endpoint binds.",
        json_schema_extra=_expect("an IP address", "127.0.0.1"),
    )
    cache_stats_log_interval_secs: float = seconds(
        5.0,
        "Interval of the 'Cache Hit Rates - Host: …, Disk: …' log line.",
        "120",
    )
    disk_offload_filter_decay_secs: float = seconds(
        600.0,
        "SSD filter: every period, all block frequencies drop by 1 (Dynamo: 600 s).",
        "120",
    )
    disk_offload_filter_max_entries: int = Field(
        1_000_000,
        ge=1,
        description="SSD filter: bound of the frequency table (Dynamo: 1,000,000 entries).",
        json_schema_extra=_expect("a whole number ≥ 1", "1000000"),
    )

    handoff_dir: Path | None = Field(
        None,
        description="Disaggregated serving on one host: the shared-memory area (under /dev/shm) "
        "through which prefill workers hand a prompt's KV blocks to decode workers: one pool "
        "directory per prefill worker (DYN_KVBM_HANDOFF_POOL), or the one pool itself.",
        json_schema_extra=_expect("a directory path under /dev/shm", "/dev/shm/dynkv-default"),
    )
    handoff_pool: str | None = Field(
        None,
        description="Disaggregated serving: the id of the handoff pool this prefill worker writes "
        "(its worker id, e.g. prefill-1): the pool is the directory of that name in "
        "DYN_KVBM_HANDOFF_DIR, and the id travels to the decode worker in kv_transfer_params. "
        "Unset: the pool is DYN_KVBM_HANDOFF_DIR itself (one prefill worker).",
        json_schema_extra=_expect("letters, digits, - and _ (no dots or slashes)", "prefill-0"),
    )
    handoff_pools: str | None = Field(
        None,
        description="Disaggregated serving, decode side: the comma-separated ids of the handoff "
        "pools this worker reads (the deployment's prefill workers); a handoff naming any other "
        "pool is refused and its prompt recomputed. Unset: the worker's own pool only.",
        json_schema_extra=_expect("pool ids separated by commas", "prefill-0,prefill-1"),
    )
    handoff_gb: float = positive(
        1.0,
        "Size of the handoff pool in decimal GB (a ring: old handoffs are overwritten).",
        "a number of decimal GB > 0",
        "1",
    )
    handoff_ttl_secs: float = seconds(
        120.0,
        "How long a decode worker accepts a prefill's handoff before recomputing.",
        "120",
    )

    @field_validator("handoff_pool")
    @classmethod
    def _pool_id(cls, value: str | None) -> str | None:
        if value is not None and not POOL_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a pool id")
        return value

    @field_validator("handoff_pools")
    @classmethod
    def _pool_ids(cls, value: str | None) -> str | None:
        if value is None:
            return None
        ids = [part.strip() for part in value.split(",") if part.strip()]
        bad = [i for i in ids if not POOL_ID.fullmatch(i)]
        if bad or not ids or len(set(ids)) != len(ids):
            raise ValueError(f"{value!r} is not a list of distinct pool ids")
        return ",".join(ids)

    @property
    def writes_handoff(self) -> bool:
        """This worker owns a handoff pool it writes (a prefill worker, or a worker of the
        single-pool layout); a worker given only DYN_KVBM_HANDOFF_POOLS just reads."""
        return self.handoff_dir is not None and (
            self.handoff_pool is not None or self.handoff_pools is None
        )

    @property
    def readable_pools(self) -> tuple[str, ...]:
        """The pool ids a handoff may name to be read here ("": DYN_KVBM_HANDOFF_DIR itself)."""
        if self.handoff_dir is None:
            return ()
        if self.handoff_pools is not None:
            return tuple(self.handoff_pools.split(","))
        return (self.handoff_pool or "",)

    @property
    def has_host_tier(self) -> bool:
        return bool(self.cpu_cache_override_num_blocks) or bool(self.cpu_cache_gb)

    @property
    def has_disk_tier(self) -> bool:
        return bool(self.disk_cache_override_num_blocks) or bool(self.disk_cache_gb)

    @property
    def disk_filter_enabled(self) -> bool:
        """The SSD filter applies to G2→G3 only, so only when both tiers exist."""
        return self.has_host_tier and self.has_disk_tier and not self.disable_disk_offload_filter

    def host_blocks(self, bytes_per_block: int) -> int:
        return blocks_for(self.cpu_cache_gb, self.cpu_cache_override_num_blocks, bytes_per_block)

    def disk_blocks(self, bytes_per_block: int) -> int:
        return blocks_for(self.disk_cache_gb, self.disk_cache_override_num_blocks, bytes_per_block)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process."""
        out: dict[str, str] = {}
        for field in type(self).model_fields:
            value = getattr(self, field)
            if value is None:
                continue
            out[self.env_name(field)] = format_env_value(value)
        return out


def blocks_for(gb: float | None, override: int | None, bytes_per_block: int) -> int:
    """Tier size in blocks: the override when > 0, else decimal GB × 1e9 ÷ bytes per block."""
    if bytes_per_block <= 0:
        raise ValueError("bytes_per_block must be positive")
    if override:
        return int(override)
    if not gb:
        return 0
    return int(gb * 1e9 // bytes_per_block)


def format_env_value(value: Any) -> str:
    """Render a setting the way the environment parser reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
