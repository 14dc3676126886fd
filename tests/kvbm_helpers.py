"""Builders shared by the KVBM tests: a small layout, settings, and a fake-free device KV."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.keys import BlockHasher
from dynkv.kvbm.layout import BlockLayout

LAYOUT = BlockLayout(
    model="test-model", dtype="bfloat16", block_size=4, num_layers=2, bytes_per_layer_block=2048
)


def settings(**kw) -> KvbmSettings:
    return KvbmSettings.model_validate(kw)


def keys_for(n_blocks: int, salt: str = "", layout: BlockLayout = LAYOUT, offset: int = 0):
    hasher = BlockHasher(layout.fingerprint(), layout.block_size)
    tokens = list(range(offset, offset + n_blocks * layout.block_size))
    return hasher.keys(tokens, extra=[salt] if salt else [])


def fill_rows(array: np.ndarray, rows, keys) -> None:
    """Deterministic content per key, so a wrong block is detectable."""
    for row, key in zip(rows, keys, strict=True):
        rng = np.random.default_rng(key & 0xFFFFFFFF)
        array[row, : LAYOUT.bytes_per_block] = rng.integers(
            0, 256, LAYOUT.bytes_per_block, np.uint8
        )


def expected_bytes(key: int) -> bytes:
    rng = np.random.default_rng(key & 0xFFFFFFFF)
    return rng.integers(0, 256, LAYOUT.bytes_per_block, np.uint8).tobytes()


def store(manager, keys) -> list[int]:
    plan = manager.start_store(keys)
    fill_rows(plan.array, plan.rows, plan.keys)
    manager.commit_store(plan)
    return plan.keys


def load(manager, keys):
    result = manager.start_load(keys).wait()
    data = [
        bytes(result.array[row, : LAYOUT.bytes_per_block]) if ok else None
        for row, ok in zip(result.rows, result.ok, strict=True)
    ]
    manager.finish_load(result)
    return result, data


@contextlib.contextmanager
def ramfs():
    """A ramfs mount: refuses O_DIRECT (EINVAL) and fallocate(2) (EOPNOTSUPP)."""
    import pytest

    path = Path(tempfile.mkdtemp(prefix="dynkv-ramfs-"))
    proc = subprocess.run(
        ["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount ramfs here (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()
