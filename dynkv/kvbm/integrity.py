"""Per-block checksums: a stored block is verified before its bytes reach vLLM (every G3 and
handoff block; G2 blocks on a sample unless DYN_KVBM_HOST_VERIFY=always, docs/kvbm.md).

The checksum is xxh3-64 of the block's bytes seeded with the block's key, so it also catches a
block that landed in the wrong slot, not only flipped bits or a torn write. A mismatch is a miss
(vLLM recomputes): never wrong KV.
"""

from __future__ import annotations

import xxhash

_MASK64 = (1 << 64) - 1


def block_checksum(data, key: int) -> int:
    """`data`: any C-contiguous buffer (bytes, memoryview, numpy row)."""
    return xxhash.xxh3_64_intdigest(memoryview(data), seed=key & _MASK64)
