"""What one KV block is, in bytes, and the fingerprint that makes its key mean something.

A block is opaque bytes: for each layer, that layer's slice of the block (K and V for
`block_size` tokens), concatenated layer after layer. Host and disk slots hold one block each,
padded to a multiple of 4096 bytes so every slot can be read and written with O_DIRECT.

The fingerprint covers everything that changes those bytes — model, dtype, per-layer shape of a
block, block size, device layout — so a key computed in one process finds the same block in
another process or after a restart, and a block written for another model is never reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import xxhash

from dynkv.kvbm.diskio import ALIGN, round_up


@dataclass(frozen=True)
class BlockLayout:
    model: str
    dtype: str
    block_size: int
    num_layers: int
    bytes_per_layer_block: int
    layer_block_shape: tuple[int, ...] = ()
    device_layout: str = "opaque"

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or self.bytes_per_layer_block <= 0 or self.block_size <= 0:
            raise ValueError(f"invalid block layout: {self}")

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.bytes_per_layer_block

    @property
    def slot_stride(self) -> int:
        """Bytes a host/disk slot occupies: the block rounded up for O_DIRECT alignment."""
        return round_up(self.bytes_per_block, ALIGN)

    def fingerprint(self) -> bytes:
        """16 bytes that differ whenever the bytes of a block would mean something else."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return xxhash.xxh3_128_digest(canonical.encode())

    def fingerprint_hex(self) -> str:
        return self.fingerprint().hex()
