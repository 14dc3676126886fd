"""The rates a worker publishes with its KV events: what a hit, a miss and its decode load cost.

- G2→G1: blocks onboarded (from either tier) per second spent copying into the device; G3→G1 adds
  the disk reads' seconds per disk block. Both are lifetime averages of the `kvbm_transfer_seconds`
  histogram and the onboard counters, None until a load happened.
- Prefill: the scheduler's own measurement for the load-or-recompute policy (`PrefillRates`,
  per prefill-length bucket, clean prefills only), empty until a prompt was computed.
- Decode: seconds a running request adds to a step (`DecodeCost`), None until measured.

The router prices each worker with these (docs/kv-events.md#scoring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynkv.kvbm.counters import Count
from dynkv.kvbm.event_settings import RatesReading, RatesSource
from dynkv.kvbm.metrics import KvbmMetrics

if TYPE_CHECKING:
    from dynkv.kvbm.decode_cost import DecodeCost
    from dynkv.kvbm.onboard_policy import PrefillRates


def _histogram(metrics: KvbmMetrics, direction: str) -> tuple[float, float]:
    r = metrics.registry
    labels = {"direction": direction}
    total = r.get_sample_value("kvbm_transfer_seconds_sum", labels) or 0.0
    count = r.get_sample_value("kvbm_transfer_seconds_count", labels) or 0.0
    return total, count


def metrics_rates(
    metrics: KvbmMetrics,
    block_size: int,
    prefill: PrefillRates | None = None,
    decode: DecodeCost | None = None,
) -> RatesSource:
    def read() -> RatesReading:
        host_blocks = metrics.value(Count.ONBOARD_H2D)
        disk_blocks = metrics.value(Count.ONBOARD_D2D)
        copy_s, _ = _histogram(metrics, "host_to_device")
        disk_s, _ = _histogram(metrics, "disk_to_host")
        g2 = g3 = None
        onboarded = host_blocks + disk_blocks
        if onboarded and copy_s > 0:
            per_block = copy_s / onboarded
            g2 = block_size / per_block
            if disk_blocks and disk_s > 0:
                g3 = block_size / (per_block + disk_s / disk_blocks)
        return RatesReading(
            prefill=prefill.published() if prefill is not None else [],
            g2_to_g1_tokens_per_s=g2,
            g3_to_g1_tokens_per_s=g3,
            decode_seconds_per_request=decode.seconds_per_request if decode is not None else None,
        )

    return read
