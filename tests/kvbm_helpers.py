"""Builders shared by the KVBM tests: a small real G1 (torch CPU tensors), settings, keys."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynkv.kvbm.config import KvbmSettings
from dynkv.kvbm.device import DeviceKV
from dynkv.kvbm.keys import BlockHasher

BLOCK_SIZE = 4
NUM_BLOCKS = 64


class G1:
    """vLLM-CPU-shaped KV tensors ([blocks, kv_heads, block_size, 2*head]) of 2 layers."""

    def __init__(self, num_blocks: int = NUM_BLOCKS) -> None:
        self.kv = {
            f"model.layers.{i}.self_attn.attn": torch.zeros(
                num_blocks, 2, BLOCK_SIZE, 128, dtype=torch.bfloat16
            )
            for i in range(2)
        }
        self.dev = DeviceKV(self.kv, num_blocks)

    def put(self, block: int, key: int) -> None:
        data = np.frombuffer(expected_bytes(key), dtype=np.uint8)
        per_layer = len(data) // len(self.kv)
        for i, t in enumerate(self.kv.values()):
            t[block].view(torch.uint8).view(-1).copy_(
                torch.from_numpy(data[i * per_layer : (i + 1) * per_layer].copy())
            )

    def get(self, block: int) -> bytes:
        return self.dev.block_bytes(block)


LAYOUT = G1().dev.layout("test-model", BLOCK_SIZE)


def settings(**kw) -> KvbmSettings:
    return KvbmSettings.model_validate(kw)


def keys_for(n_blocks: int, salt: str = "", offset: int = 0):
    hasher = BlockHasher(LAYOUT.fingerprint(), LAYOUT.block_size)
    tokens = list(range(offset, offset + n_blocks * LAYOUT.block_size))
    return hasher.keys(tokens, extra=[salt] if salt else [])


def expected_bytes(key: int) -> bytes:
    rng = np.random.default_rng(key & 0xFFFFFFFF)
    return rng.integers(0, 256, LAYOUT.bytes_per_block, np.uint8).tobytes()


def store(manager, g1: G1, keys, first_block: int = 0) -> int:
    blocks = list(range(first_block, first_block + len(keys)))
    for block, key in zip(blocks, keys, strict=True):
        g1.put(block, key)
    return manager.save(keys, g1.dev, blocks)


def load(manager, g1: G1, keys, first_block: int = 32):
    blocks = list(range(first_block, first_block + len(keys)))
    for b in blocks:  # make stale content visible
        for t in g1.kv.values():
            t[b].zero_()
    failed = manager.load(keys, g1.dev, blocks)
    data = [None if b in failed else g1.get(b) for b in blocks]
    return failed, data


@dataclass
class Request:
    """What the connector's scheduler half reads of a vLLM request (vLLM 0.32's `Request`)."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    cache_salt: str | None = None
    lora_request: object = None
    mm_features: object = None
    prompt_embeds: object = None
    kv_transfer_params: dict | None = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.all_token_ids)


class Blocks:
    """vLLM's `KVCacheBlocks` as `update_state_after_alloc` reads it: one KV cache group."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


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
