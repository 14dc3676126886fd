"""The KVBM counters: one enum member per counter, its Prometheus family name and help beside it.

The store counts events in its `StoreReport` by member, the leader adds them to the metrics by
member, and the metrics module registers one `prometheus_client.Counter` per member. A misspelt
counter is an `AttributeError` where it is written, not a metric that silently stays at zero.
The family names are Dynamo's (`kvbm_offload_blocks_d2h`; `_total` on the wire); dashboards and
tests read them, so a name here changes only together with them.
"""

from __future__ import annotations

from enum import Enum


class Count(Enum):
    """A KVBM counter. `metric` is the Prometheus family name, `help` its description."""

    MATCHED_TOKENS = ("kvbm_matched_tokens", "Tokens whose KV was onboarded instead of computed")
    LOOKUP_BLOCKS = (
        "kvbm_lookup_blocks",
        "Blocks asked of KVBM (those vLLM's own prefix cache did not hold): hit rates' denominator",
    )
    HOST_HIT_BLOCKS = ("kvbm_host_hit_blocks", "Blocks asked of KVBM that G2 held")
    DISK_HIT_BLOCKS = ("kvbm_disk_hit_blocks", "Blocks asked of KVBM that G3 held (and G2 did not)")
    OFFLOAD_D2H = ("kvbm_offload_blocks_d2h", "Blocks offloaded device → host (G1→G2)")
    OFFLOAD_H2D = ("kvbm_offload_blocks_h2d", "Blocks offloaded host → disk (G2→G3)")
    OFFLOAD_D2D = ("kvbm_offload_blocks_d2d", "Blocks offloaded device → disk (G1→G3)")
    ONBOARD_H2D = ("kvbm_onboard_blocks_h2d", "Blocks onboarded host → device (G2→G1)")
    ONBOARD_D2D = ("kvbm_onboard_blocks_d2d", "Blocks onboarded disk → device (G3→G1)")
    INTEGRITY_FAILURES = (
        "kvbm_integrity_failures",
        "Stored blocks whose checksum did not match on load (recomputed instead)",
    )
    LOAD_FAILURES = ("kvbm_load_failures", "Blocks that could not be onboarded (I/O, eviction)")
    DISK_READ_TIMEOUTS = (
        "kvbm_disk_read_timeouts",
        "Disk (G3) blocks not read within DYN_KVBM_DISK_READ_TIMEOUT_MS (recomputed instead)",
    )
    OFFLOAD_DROPPED = (
        "kvbm_offload_dropped_blocks",
        "Blocks not offloaded because every slot was busy or the disk queue was full",
    )
    STORES_DISCARDED = (
        "kvbm_store_discarded_blocks",
        "Blocks not stored because their step also failed to load blocks (KV computed over a "
        "failed load is not the prompt's; it is stored when vLLM recomputes it)",
    )
    JOURNAL_FAILURES = (
        "kvbm_disk_journal_failures",
        "Times the G3 index journal could not be written (G3 then serves without persisting "
        "its index across restarts)",
    )
    # G2 pressure and the SSD filter, read by `dynkv advise` (docs/advise.md)
    HOST_EVICTED = ("kvbm_host_evicted_blocks", "G2 blocks evicted (least recently used) for room")
    HOST_EVICTED_UNUSED = (
        "kvbm_host_evicted_unused_blocks",
        "G2 blocks evicted without a single G2 hit since they were stored",
    )
    REUSE_AFTER_EVICT_DISK = (
        "kvbm_reuse_after_evict_disk_blocks",
        "Blocks reused after G2 had evicted them, served by G3",
    )
    REUSE_AFTER_EVICT_RECOMPUTED = (
        "kvbm_reuse_after_evict_recomputed_blocks",
        "Blocks reused after G2 had evicted them that no tier held (recomputed)",
    )
    FILTER_STARVED = (
        "kvbm_disk_filter_starved_blocks",
        "Recomputed blocks that G2 had evicted without writing them to G3 (the SSD filter "
        "had not yet seen them twice)",
    )
    DISK_EVICTED = ("kvbm_disk_evicted_blocks", "G3 blocks evicted (least recently used) for room")
    HANDOFF_SENT = (
        "kvbm_handoff_blocks_sent",
        "Prefill: prompt blocks written to the shared handoff pool for a decode worker",
    )
    HANDOFF_RECEIVED = (
        "kvbm_handoff_blocks_received",
        "Decode: prompt blocks read from the handoff pool instead of computed",
    )
    HANDOFF_MISSED = (
        "kvbm_handoff_blocks_missed",
        "Decode: handed-off blocks that were gone or overwritten (recomputed)",
    )

    ONBOARD_SKIPPED = (
        "kvbm_onboard_skipped_blocks",
        "Matched blocks left for vLLM to recompute because loading them would be slower "
        "(docs/onboard-policy.md)",
        ("tier", "reason"),
    )
    PREFILL_SECONDS_SAVED = (
        "kvbm_prefill_seconds_saved",
        "Onboarded tokens × measured prefill seconds per token, minus their load time",
    )

    def __init__(  # noqa: A002 (help: prometheus' own word)
        self, metric: str, help: str, labels: tuple[str, ...] = ()
    ) -> None:
        self.metric = metric
        self.help = help
        self.labels = labels  # label names; such a counter is counted with their values

    @property
    def sample(self) -> str:
        """The sample name on the wire (`prometheus_client` appends `_total` to counters)."""
        return self.metric + "_total"
