"""G2's pool is committed when it is made (`DYN_KVBM_HOST_PREFAULT`, docs/kvbm.md#g2-memory), so
that no store inside a request's step pays the kernel's first-touch page faults; off, the kernel
commits it page by page. Residency is read from the process's resident set."""

from __future__ import annotations

import psutil

import dynkv.kvbm.host as host
from dynkv.kvbm.config import KvbmSettings

MB = 1 << 20
SLOTS, STRIDE = 64, MB  # a 64 MiB pool


def resident_growth(**kwargs) -> tuple[int, host.HostArray]:
    proc = psutil.Process()
    before = proc.memory_info().rss
    pool = host.HostArray(SLOTS, STRIDE, **kwargs)
    return proc.memory_info().rss - before, pool


def test_a_prefaulted_pool_is_resident_and_zero_before_any_store():
    grown, pool = resident_growth(prefault=True)
    assert grown >= 60 * MB
    assert not pool.array[:, ::4096].any()


def test_without_prefault_the_pool_is_committed_page_by_page():
    grown, pool = resident_growth(prefault=False)
    assert grown < 16 * MB
    pool.array[:8] = 1  # the first stores commit their own pages only
    assert pool.array[:8].all() and not pool.array[8:, ::4096].any()


def test_kernels_without_populate_write_get_one_write_per_page(monkeypatch):
    monkeypatch.setattr(host, "MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL
    grown, pool = resident_growth(prefault=True)
    assert grown >= 60 * MB and not pool.array[:, ::4096].any()


def test_prefault_is_on_by_default_and_reaches_the_store():
    from dynkv.kvbm.layout import BlockLayout
    from dynkv.kvbm.store import BlockStore

    assert KvbmSettings().host_prefault is True
    layout = BlockLayout("m", "float32", 16, 2, 4096, (1, 16, 64))
    proc = psutil.Process()
    for prefault, bound in ((True, lambda g: g >= 60 * MB), (False, lambda g: g < 16 * MB)):
        before = proc.memory_info().rss
        store = BlockStore(
            layout,
            KvbmSettings(
                cpu_cache_gb=0.0, cpu_cache_override_num_blocks=8192, host_prefault=prefault
            ),
        )
        assert bound(proc.memory_info().rss - before), prefault
        store.close()
