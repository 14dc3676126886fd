"""`dynkv bench offload --g3-read-delay-ms`: the slow-disk variant's configurations and summary."""

from __future__ import annotations

from pathlib import Path

from dynkv.bench.offload import SLOW_DISK_CONFIGS, slow_disk_configurations, summarize_slow_disk


def test_slow_disk_configurations_compare_the_policies_on_one_disk():
    configs = slow_disk_configurations(100, 1.0, Path("/w"), 70)
    assert tuple(c.name for c in configs) == SLOW_DISK_CONFIGS
    # the delay is installed where the disk pool lives: every engine in the bench's process
    assert all(c.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" for c in configs)
    recompute, auto, always = configs
    assert not recompute.connector and recompute.slow_disk_ms == 0
    assert (auto.env["DYN_KVBM_ONBOARD_POLICY"], always.env["DYN_KVBM_ONBOARD_POLICY"]) == (
        "auto",
        "always",
    )
    assert auto.slow_disk_ms == always.slow_disk_ms == 70
    assert auto.env["DYN_KVBM_DISK_CACHE_DIR"] != always.env["DYN_KVBM_DISK_CACHE_DIR"]


def test_slow_disk_summary_is_relative_to_recompute():
    def r2(ms):
        return {"round2_median_ms": ms}

    out = summarize_slow_disk(
        {"recompute": r2(1000.0), "g3_slow_auto": r2(1040.0), "g3_slow_always": r2(4000.0)},
        g3_read_delay_ms=70,
    )
    assert out["g3_slow_auto_vs_recompute"] == 1.04
    assert out["g3_slow_always_vs_recompute"] == 4.0
    assert out["targets"] == {"g3_slow_auto_le_1.05x_recompute": True}
    partial = summarize_slow_disk({"g3_slow_auto": r2(1.0)})
    assert partial["targets"]["g3_slow_auto_le_1.05x_recompute"] is None
