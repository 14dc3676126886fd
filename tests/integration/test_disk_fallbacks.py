"""G3 on a filesystem that lacks fallocate(2) and O_DIRECT (ramfs), and on one that has both."""

from __future__ import annotations

import pytest
from kvbm_helpers import G1, LAYOUT, expected_bytes, keys_for, load, ramfs, settings, store

from dynkv.kvbm.diskio import probe_fallocate, probe_o_direct
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.manager import BlockManager

pytestmark = pytest.mark.integration


def disk_manager(directory, **kw):
    return BlockManager(
        LAYOUT, settings(disk_cache_override_num_blocks=8, disk_cache_dir=directory, **kw)
    )


def test_probes_see_the_real_syscalls():
    assert probe_fallocate("/dev/shm") is None and probe_o_direct("/dev/shm") is None
    with ramfs() as path:
        assert probe_fallocate(path).errno == 95  # EOPNOTSUPP, not glibc's silent emulation
        assert probe_o_direct(path).errno == 22  # EINVAL


def test_o_direct_refused_names_the_variable():
    with ramfs() as path, pytest.raises(KvbmConfigError) as info:
        disk_manager(path / "g3")
    assert "O_DIRECT" in info.value.cause
    assert "DYN_KVBM_DISK_DISABLE_O_DIRECT" in info.value.fix


def test_fallocate_missing_names_the_variable():
    with ramfs() as path, pytest.raises(KvbmConfigError) as info:
        disk_manager(path / "g3", disk_disable_o_direct=True)
    assert "fallocate" in info.value.cause
    assert "DYN_KVBM_DISK_ZEROFILL_FALLBACK" in info.value.fix


def test_both_fallbacks_make_ramfs_work():
    with ramfs() as path:
        m = disk_manager(path / "g3", disk_disable_o_direct=True, disk_zerofill_fallback=True)
        assert (path / "g3" / "blocks.bin").stat().st_size == 8 * LAYOUT.slot_stride
        keys = keys_for(3)
        g1 = G1()
        store(m, g1, keys)
        m.flush()
        failed, data = load(m, g1, keys)
        assert failed == [] and data == [expected_bytes(k) for k in keys]
        m.close()


def test_tmpfs_accepts_both(tmp_path_factory):
    import tempfile

    directory = tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-")
    try:
        m = disk_manager(directory)
        assert m.store.disk.o_direct
        keys = keys_for(2)
        g1 = G1()
        store(m, g1, keys)
        m.flush()
        assert load(m, g1, keys)[0] == []
        m.close()
    finally:
        import shutil

        shutil.rmtree(directory)
