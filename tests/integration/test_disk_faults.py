"""Disk-tier faults: whatever happens to the files, loads return correct bytes or a miss.

Expected behaviour, written down:
- truncated pool file: blocks past the end fail their read → recomputed, counted, one log line
  per load (not one per block);
- disk full at start: the pool cannot be preallocated → a clear error naming the size setting;
- read-only filesystem at start: a clear error naming the directory setting; under a running
  pool the kernel refuses a read-only remount (EBUSY: the pool is open for writing), and a
  read-only bind mount over the directory only stops the journal (its next new file fails);
- directory deleted under a running engine: the open pool keeps working (the kernel keeps the
  unlinked files), and the next start begins with an empty pool — nothing wrong is served; the
  index journal's next compaction (which writes a new file there) fails: journaling stops with one
  log line and one count, and serving goes on;
- disk full under a running pool (the preallocated pool cannot run out, the index journal can):
  every write still completes its bookkeeping (flush returns, no G2 slot stays pinned), loads
  stay correct, the failure is counted once and logged once, and a restart starts with an empty
  G3 rather than trusting an index that stopped being written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from kvbm_helpers import G1, LAYOUT, expected_bytes, keys_for, load, settings, store

from dynkv.kvbm.counters import Count
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.manager import BlockManager

pytestmark = pytest.mark.integration


def g3(directory, blocks=16, **kw):
    return BlockManager(
        LAYOUT, settings(disk_cache_override_num_blocks=blocks, disk_cache_dir=directory, **kw)
    )


def mount_tmpfs(options: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="dynkv-fault-"))
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode:
        path.rmdir()
        pytest.skip(f"cannot mount tmpfs here (needs root): {proc.stderr.strip()}")
    return path


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)
    path.rmdir()


def test_truncated_pool_file_is_a_miss(tmp_path, caplog):
    m = g3(tmp_path / "g3")
    g1 = G1()
    keys = keys_for(6)
    store(m, g1, keys)
    m.flush()
    slots = {k: m.leader.disk.slot_of(k) for k in keys}
    with open(tmp_path / "g3" / "blocks.bin", "r+b") as fh:
        fh.truncate(3 * LAYOUT.slot_stride)  # slots 3.. are gone
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        failed, data = load(m, g1, keys, first_block=40)
    lost = sorted(40 + i for i, k in enumerate(keys) if slots[k] >= 3)
    assert failed == lost and lost
    for i, k in enumerate(keys):
        assert data[i] is None if slots[k] >= 3 else data[i] == expected_bytes(k)
    assert m.metrics.value(Count.LOAD_FAILURES) == len(lost)
    lines = [r.message for r in caplog.records if "could not be read" in r.message]
    assert len(lines) == 1 and f"{len(lost)} disk block(s)" in lines[0], lines
    assert m.match(keys).blocks < len(keys)  # the lost blocks left the index
    m.close()


def test_disk_full_at_start_names_the_size_setting():
    path = mount_tmpfs("size=32k")
    try:
        with pytest.raises(KvbmConfigError) as info:
            g3(path / "g3", blocks=64)  # 64 × 4 KiB > 32 KiB
        assert "not enough free space" in info.value.cause
        assert "DYN_KVBM_DISK_CACHE_GB" in info.value.fix
    finally:
        unmount(path)


def test_disk_full_while_zero_filling_names_the_size_setting(monkeypatch):
    """A filesystem without fallocate(2) and the zero-fill fallback on: running out of space
    while writing the zeros is the same cause + fix as above, and gives the space back."""
    import errno

    from dynkv.kvbm import disk

    def no_fallocate(fd, length, offset=0):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(disk, "fallocate", no_fallocate)  # tmpfs has it; ramfs has no size limit
    path = mount_tmpfs("size=32k")
    try:
        with pytest.raises(KvbmConfigError) as info:
            g3(path / "g3", blocks=64, disk_disable_o_direct=True, disk_zerofill_fallback=True)
        assert "not enough free space" in info.value.cause
        assert "DYN_KVBM_DISK_CACHE_GB" in info.value.fix
        assert (path / "g3" / "blocks.bin").stat().st_size == 0  # nothing left filling the disk
    finally:
        unmount(path)


def test_a_stalled_disk_read_is_a_counted_miss_not_a_frozen_engine(tmp_path, caplog):
    """A read that never completes (a hung device) costs one deadline: the blocks are
    recomputed, counted, and the engine goes on."""
    from concurrent.futures import Future

    m = g3(tmp_path / "g3", disk_read_timeout_ms=50)
    g1 = G1()
    keys = keys_for(4)
    store(m, g1, keys)
    m.flush()
    stalled: Future = Future()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(m.store.disk, "read_run", lambda first, bufs, then=None: stalled)
    result: list = []
    loader = threading.Thread(target=lambda: result.append(load(m, g1, keys)), daemon=True)
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        loader.start()
        loader.join(timeout=10)
    frozen = loader.is_alive()
    # let the old code's wait end, so the thread does not outlive the test
    stalled.set_result((4, None))
    loader.join(timeout=10)
    monkeypatch.undo()
    assert not frozen, "the load waited for the stalled disk"
    failed, data = result[0]
    assert failed == [32, 33, 34, 35] and data == [None] * 4
    assert m.metrics.value(Count.DISK_READ_TIMEOUTS) == 4
    assert m.metrics.value(Count.LOAD_FAILURES) == 0
    assert any("DYN_KVBM_DISK_READ_TIMEOUT_MS" in r.getMessage() for r in caplog.records)
    # the blocks are still on disk (a slow disk is not a bad block): a later load finds them
    failed, data = load(m, g1, keys)
    assert failed == [] and data == [expected_bytes(k) for k in keys]
    m.close()


def test_read_only_filesystem_names_the_directory_setting():
    path = mount_tmpfs("size=1m,ro")
    try:
        with pytest.raises(KvbmConfigError) as info:
            g3(path / "g3")
        assert "DYN_KVBM_DISK_CACHE_DIR" in info.value.fix
    finally:
        unmount(path)


def _pool_whose_directory_was_deleted(directory: Path) -> tuple[BlockManager, G1, list]:
    """A G3 pool in `directory` holding three stored blocks (their keys returned), then the
    directory deleted under it."""
    m = g3(directory)
    g1 = G1()
    first = keys_for(3)
    store(m, g1, first)
    m.flush()
    shutil.rmtree(directory)
    return m, g1, first


def test_directory_deleted_under_a_running_pool(tmp_path):
    directory = tmp_path / "g3"
    m, g1, first = _pool_whose_directory_was_deleted(directory)
    # the engine keeps its open (now unlinked) pool: stores and loads stay correct
    second = keys_for(3, salt="after")
    store(m, g1, second, first_block=10)
    m.flush()
    failed, data = load(m, g1, first + second)
    assert failed == [] and data == [expected_bytes(k) for k in first + second]
    m.close()
    # a restart finds nothing (the files are gone) and starts clean
    m = g3(directory)
    assert m.stats()["disk_blocks_used"] == 0 and m.match(first).blocks == 0
    m.close()


def _journal_failures(m: BlockManager) -> float:
    return m.metrics.value(Count.JOURNAL_FAILURES)


def test_directory_deleted_then_the_journal_compacts(tmp_path, caplog, monkeypatch):
    m, g1, first = _pool_whose_directory_was_deleted(tmp_path / "g3")
    monkeypatch.setattr(m.store.journal, "needs_compaction", lambda: True)  # as after 4k writes
    second = keys_for(3, salt="after")
    with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
        store(m, g1, second, first_block=10)
        m.flush()
        store(m, g1, keys_for(2, salt="more"), first_block=20)
        m.flush()
    failed, data = load(m, g1, first + second)
    assert failed == [] and data == [expected_bytes(k) for k in first + second]
    assert _journal_failures(m) == 1
    assert len([r for r in caplog.records if "cannot be written" in r.message]) == 1
    m.close()


def test_disk_full_under_a_running_pool(caplog):
    """The pool file is preallocated; the journal beside it grows until the filesystem is full."""
    stride = LAYOUT.slot_stride
    path = mount_tmpfs(f"size={16 * stride + 64 * 1024}")
    try:
        kw = dict(cpu_cache_override_num_blocks=8, disable_disk_offload_filter=True)
        m = g3(path / "g3", **kw)
        filler = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # ENOSPC: the filesystem is full now
            while True:
                os.write(filler, b"x" * 512)
        os.close(filler)
        g1 = G1()
        batches = [keys_for(4, salt=str(i)) for i in range(300)]  # ~10 KB of journal records
        with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
            for i, keys in enumerate(batches):
                store(m, g1, keys, first_block=(i % 8) * 4)
            flushed = threading.Thread(target=m.flush, daemon=True)
            flushed.start()
            flushed.join(10)
        assert not flushed.is_alive(), "flush() hangs after a journal write failed"
        assert m.stats()["offloads_in_flight"] == 0  # every G2 slot was released
        assert _journal_failures(m) == 1
        assert len([r for r in caplog.records if "cannot be written" in r.message]) == 1
        assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log
        last = batches[-1]
        failed, data = load(m, g1, last)
        assert failed == [] and data == [expected_bytes(k) for k in last]
        m.close()
        os.unlink(path / "filler")
        m = g3(path / "g3", **kw)  # the truncated journal: nothing stale is offered
        assert m.stats()["disk_blocks_used"] == 0 and m.match(last).blocks == 0
        m.close()
    finally:
        unmount(path)


def test_read_only_under_a_running_pool(caplog, monkeypatch):
    """A remount read-only is refused while the pool is open for writing (EBUSY); a read-only
    bind mount laid over the directory is not, and then the journal's next new file fails
    (EROFS): journaling stops with one line and one count, the open pool keeps serving."""
    path = mount_tmpfs("size=8m")
    bound = False
    try:
        m = g3(path / "g3")
        g1 = G1()
        first = keys_for(3)
        store(m, g1, first)
        m.flush()
        busy = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
        assert busy.returncode != 0  # "mount point is busy"
        for cmd in (["mount", "--bind"], ["mount", "-o", "remount,bind,ro"]):
            proc = subprocess.run([*cmd, str(path / "g3"), str(path / "g3")], capture_output=True)
            if cmd[1] == "--bind":
                bound = proc.returncode == 0
            if proc.returncode:
                pytest.skip(f"cannot bind-mount read-only here: {proc.stderr.decode().strip()}")
        monkeypatch.setattr(m.store.journal, "needs_compaction", lambda: True)
        second = keys_for(3, salt="ro")
        with caplog.at_level(logging.WARNING, logger="dynkv.kvbm"):
            store(m, g1, second, first_block=10)
            m.flush()
        failed, data = load(m, g1, first + second)
        assert failed == [] and data == [expected_bytes(k) for k in first + second]
        assert _journal_failures(m) == 1
        lines = [r.message for r in caplog.records if "cannot be written" in r.message]
        assert len(lines) == 1 and "Read-only file system" in lines[0], lines
        m.close()
    finally:
        if bound:
            subprocess.run(["umount", str(path / "g3")], check=False)
        unmount(path)
