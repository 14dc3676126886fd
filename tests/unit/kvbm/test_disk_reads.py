"""G3 reads: each run's checksums are taken by the I/O thread that read it, over the bytes it
read (real files, a real thread pool), and a load reads in runs small enough to be several in
flight at once."""

from __future__ import annotations

import threading

import numpy as np

from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.disk_tier import MAX_READ_RUN, MAX_RUN, runs
from dynkv.kvbm.integrity import block_checksum

STRIDE = 4096


def test_a_read_run_hands_what_it_read_to_then_on_its_io_thread(tmp_path):
    pool = DiskPool(tmp_path / "g3", slots=4, stride=STRIDE, o_direct=False, zerofill_fallback=True)
    try:
        data = [np.full(STRIDE, i + 1, dtype=np.uint8) for i in range(3)]
        pool.write_run(0, data).result()
        rows = [np.zeros(STRIDE, dtype=np.uint8) for _ in range(3)]
        seen: dict = {}

        def then(n: int) -> list[int]:
            seen["thread"] = threading.current_thread().name
            return [block_checksum(rows[i], 7) for i in range(n)]

        n, sums = pool.read_run(0, rows, then).result()
        assert n == 3 and sums == [block_checksum(d, 7) for d in data]
        assert seen["thread"].startswith("kvbm-disk")
        assert pool.read_run(1, rows[:2]).result() == (2, None)
    finally:
        pool.close()


def test_reads_are_split_finer_than_writes():
    assert MAX_READ_RUN < MAX_RUN
    slots = list(range(2 * MAX_READ_RUN + 1))
    reads = runs(slots, lambda s: s, MAX_READ_RUN)
    assert [len(r) for r in reads] == [MAX_READ_RUN, MAX_READ_RUN, 1]
    assert sum(reads, []) == slots
    assert [len(r) for r in runs(slots, lambda s: s)] == [len(slots)]
