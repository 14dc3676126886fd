"""Deterministic random weights, written as a bf16 safetensors file without torch.

numpy has no bfloat16, so float32 samples are rounded to bf16 (round to nearest even) by bit
arithmetic, and the safetensors container (8-byte header length, JSON header, raw little-endian
data) is written by hand: generation then needs only numpy, and runs on hosts where torch is
not installed (the launcher may prepare a model before any vLLM environment exists).

Each tensor draws from its own stream, seeded by (seed, CRC-32 of its name), so the bytes of a
tensor depend only on the seed, its name and its shape: the same seed gives a byte-identical file.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dynkv.model.presets import INIT_STD, ModelShape

_BF16_ONE = 0x3F80


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even. Inputs must be finite."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype("<u2")


def tensor_bits(name: str, dims: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor's bf16 bits: RMSNorm scales are ones (as Llama initialises them), the rest
    Normal(0, INIT_STD)."""
    if name.endswith("norm.weight"):
        return np.full(dims, _BF16_ONE, dtype="<u2")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(dims, dtype=np.float32)
    values *= np.float32(INIT_STD)
    return to_bf16_bits(values)


def _header(shape: ModelShape, metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dims in shape.tensor_shapes().items():
        size = 2 * int(np.prod(dims))
        entries[name] = {
            "dtype": "BF16",
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    # The format asks for the data to start 8-byte aligned; spaces are the conventional padding.
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: Path, shape: ModelShape, seed: int) -> None:
    """Tensor by tensor, so memory stays at the size of the largest tensor (bench: the 2048 × 768 embedding)."""
    header = _header(shape, {"format": "pt", "generator": "dynkv", "seed": str(seed)})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, dims in shape.tensor_shapes().items():
            _write(f, tensor_bits(name, dims, seed))


def _write(f: BinaryIO, bits: np.ndarray) -> None:
    f.write(memoryview(np.ascontiguousarray(bits)).cast("B"))
