"""The runtime holds no memory per request: after a warm-up that fills the tiers, 1,500 more
lookups, loads and stores (G2 and G3, with evictions) leave Python's traced memory where it was.
The load test (scripts/load) sees vLLM's worker process, where this runtime's store lives, grow
while torch and oneDNN warm their caches; this pins down that none of it is the runtime's."""

from __future__ import annotations

import gc
import tracemalloc

from kvbm_helpers import G1, LAYOUT, keys_for, load, settings, store

from dynkv.kvbm.manager import BlockManager


def test_no_memory_per_request(tmp_path):
    m = BlockManager(
        LAYOUT,
        settings(
            cpu_cache_override_num_blocks=64,
            disk_cache_override_num_blocks=256,
            disable_disk_offload_filter=True,
            disk_cache_dir=tmp_path / "g3",
        ),
    )
    g1 = G1()

    def request(i: int) -> None:
        keys = keys_for(6, salt=str(i % 300))  # 300 prompts cycling through 64 + 256 slots
        m.match(keys)
        load(m, g1, keys)
        store(m, g1, keys)

    for i in range(800):  # warm-up: every slot used, the index at its bound
        request(i)
    m.flush()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(800, 2300):
            request(i)
        m.flush()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        m.close()
    assert grown < 256 * 1024, f"{grown} bytes held after 1,500 more requests"
