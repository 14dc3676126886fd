"""vLLM's KV event messages as vLLM 0.32 writes them, without importing vLLM (seconds per process).

The structs mirror `vllm.distributed.kv_events` field for field (msgpack: the batch as an array,
each event a map tagged `type`); `tests/unit/test_g1_events.py` checks their bytes against a
payload encoded by vLLM 0.32 itself. `VllmPublisher` sends them as vLLM's ZMQ publisher does:
a PUB socket bound to the endpoint, messages [topic, seq (8 bytes, big-endian, from 0), batch].
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(_Event):
    pass


def stored(
    hashes: list[bytes | int],
    parent: bytes | int | None,
    tokens: list[int],
    block_size: int,
    *,
    salt: str | None = None,
    lora: str | None = None,
    medium: str = "GPU",
    group: int = 0,
) -> BlockStored:
    """A BlockStored as vLLM builds it: the salt (and LoRA name) in the first block's extra keys
    when the chain starts at the request's first block."""
    extra: list[tuple[Any, ...] | None] | None = None
    first = tuple(x for x in (lora, salt) if x) if parent is None else ()
    if first:
        extra = [first] + [None] * (len(hashes) - 1)
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        lora_id=1 if lora else None,
        medium=medium,
        lora_name=lora,
        extra_keys=extra,
        group_idx=group,
    )


def encode(events: list[Any], ts: float = 1.5) -> bytes:
    return msgspec.msgpack.encode(EventBatch(ts=ts, events=events, data_parallel_rank=0))


class VllmPublisher:
    """vLLM's ZMQ KV event publisher, reduced to its wire behaviour."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.seq = 0

    def publish(self, events: list[Any], *, skip: int = 0) -> None:
        """Send one batch; `skip` batch numbers are consumed first (batches a subscriber lost)."""
        self.seq += skip
        self.sock.send_multipart([b"", self.seq.to_bytes(8, "big"), encode(events, time.time())])
        self.seq += 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
